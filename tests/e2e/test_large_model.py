"""A model twice the size of the memory its handling may take, through the whole path:
converted with external data, packed, signed, imported, activated, answering. moatctl and
moatd stay within the streaming bound (large_model.py; `bash scripts/large-model-drill.sh 6`
runs the same at 6 GB)."""

from large_model import STREAMING_BOUND_BYTES, SUITE, drill, over_bound


def test_a_model_larger_than_the_bound_streams_through(tmp_path, pki, alice):
    figures = drill(tmp_path, pki, alice, SUITE, log=lambda _: None)
    assert figures["external_data_bytes"] > 2 * STREAMING_BOUND_BYTES, figures
    assert not over_bound(figures), (over_bound(figures), figures)
    assert figures["answered"], figures
