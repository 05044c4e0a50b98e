"""moat-model: brings a tuned language model to moat.

`moat-model convert` turns a Hugging Face checkpoint or a GGUF into moat's fused ONNX graph,
`moat-model describe` writes moat-model.json for an existing ONNX export, and
`moat-model check` proves a converted graph computes what its checkpoint computes.
See docs/bring-your-model.md.
"""

__version__ = "0.2.0"
