"""benchmarks/bench_train.py: the --tokens list (one row per value) and its refusal of bad values."""
import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_train import token_counts  # noqa: E402


def test_token_counts_single_and_list():
    assert token_counts("131072") == [131072]
    assert token_counts("32768,65536") == [32768, 65536]


@pytest.mark.parametrize("text", ["", "0", "32768,-1", "32k", "1.5"])
def test_token_counts_refuses_bad_values(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--tokens expects positive integers"):
        token_counts(text)
