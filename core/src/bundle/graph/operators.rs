//! The operators moat serves: an allow-list, so that a graph can reach only kernels that
//! the graphs moat is built for exercise, and no custom operator library at all.
//!
//! The list is what these graphs use, with the close relatives their exporters emit for
//! other architectures of the same kind (decoders and BERT-style encoders):
//!
//! - the graphs `tools/model` writes (`onnx_fused.py`, `onnx_optimum.py`, `onnx_fp16.py`,
//!   `encoder_graph.py`): the fixtures, SmolLM2 exact and fast, all-MiniLM-L6-v2;
//! - `optimum-cli export onnx` (plain ONNX operators, opset 14 to 18);
//! - onnxruntime-genai's model builder and ONNX Runtime's transformer optimizer (the
//!   `com.microsoft` attention, normalisation, activation and quantised-matmul kernels).
//!
//! Left out on purpose: operators that parse or decode data (strings, regular expressions,
//! images), random generators, sequence and optional types, signal processing, vision
//! operators and the `ai.onnx.ml` domain. A graph that needs one is refused with the
//! operator's name; extending this list is a change to review like any other code.

/// The standard ONNX domain, as a graph may spell it.
pub const ONNX_DOMAINS: [&str; 2] = ["", "ai.onnx"];
/// ONNX Runtime's own operators.
pub const MICROSOFT_DOMAIN: &str = "com.microsoft";

/// Operators of the standard domain (and ONNX Runtime's kernels registered under it).
const ONNX_OPERATORS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "Attention",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "CumSum",
    "DequantizeLinear",
    "Div",
    "Dropout",
    "DynamicQuantizeLinear",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "Greater",
    "GreaterOrEqual",
    "GroupNormalization",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "If",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "Loop",
    "LpNormalization",
    "MatMul",
    "MatMulInteger",
    "Max",
    "Mean",
    "Min",
    "Mish",
    "Mod",
    "Mul",
    "Neg",
    "NonZero",
    "Not",
    "OneHot",
    "Or",
    "Pad",
    "Pow",
    "PRelu",
    "QuantizeLinear",
    "Range",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "RMSNormalization",
    "RotaryEmbedding",
    "Round",
    "ScatterElements",
    "ScatterND",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "SimplifiedLayerNormalization",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "Softplus",
    "Softsign",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "TopK",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
];

/// ONNX Runtime's contrib operators that transformer exports and its optimizer use.
const MICROSOFT_OPERATORS: &[&str] = &[
    "Attention",
    "BiasAdd",
    "BiasGelu",
    "DequantizeLinear",
    "DynamicQuantizeMatMul",
    "EmbedLayerNormalization",
    "FastGelu",
    "FusedMatMul",
    "GatherBlockQuantized",
    "Gelu",
    "GemmFastGelu",
    "GroupQueryAttention",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "MoE",
    "MultiHeadAttention",
    "PackedMultiHeadAttention",
    "PagedAttention",
    "QMoE",
    "QuantizeLinear",
    "QuickGelu",
    "RotaryEmbedding",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SparseAttention",
];

/// Whether a graph may import operator set `domain`.
pub fn domain_served(domain: &[u8]) -> bool {
    ONNX_DOMAINS
        .iter()
        .chain([&MICROSOFT_DOMAIN])
        .any(|d| d.as_bytes() == domain)
}

/// Whether moat serves a node of type `op_type` in `domain`.
pub fn operator_served(domain: &[u8], op_type: &[u8]) -> bool {
    let list = if ONNX_DOMAINS.iter().any(|d| d.as_bytes() == domain) {
        ONNX_OPERATORS
    } else if domain == MICROSOFT_DOMAIN.as_bytes() {
        MICROSOFT_OPERATORS
    } else {
        return false;
    };
    list.iter().any(|op| op.as_bytes() == op_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_are_sorted_and_free_of_repeats() {
        for list in [ONNX_OPERATORS, MICROSOFT_OPERATORS] {
            let mut sorted = list.to_vec();
            sorted.sort_by_key(|op| op.to_ascii_lowercase());
            sorted.dedup();
            assert_eq!(sorted, list);
        }
    }

    #[test]
    fn operators_are_served_only_in_their_own_domain() {
        assert!(operator_served(b"", b"MatMul"));
        assert!(operator_served(b"ai.onnx", b"MatMul"));
        assert!(operator_served(b"com.microsoft", b"GroupQueryAttention"));
        assert!(!operator_served(b"", b"GroupQueryAttention"));
        assert!(!operator_served(b"com.microsoft", b"MatMul"));
        assert!(!operator_served(b"custom.ops", b"MatMul"));
        // Standard operators that decode or parse data are not served.
        for op in [
            "ImageDecoder",
            "RegexFullMatch",
            "StringSplit",
            "RandomNormal",
        ] {
            assert!(!operator_served(b"", op.as_bytes()), "{op}");
        }
        assert!(!operator_served(b"", b"matmul"), "names are case-sensitive");
    }

    #[test]
    fn only_the_standard_and_onnx_runtime_domains_are_served() {
        assert!(domain_served(b""));
        assert!(domain_served(b"ai.onnx"));
        assert!(domain_served(b"com.microsoft"));
        for domain in [
            "ai.onnx.ml",
            "com.microsoft.nchwc",
            "custom",
            "com.microsoft ",
        ] {
            assert!(!domain_served(domain.as_bytes()), "{domain}");
        }
    }
}
