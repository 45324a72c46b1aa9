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


def test_accumulation_micro_batches():
    from bench_train import accumulation
    assert accumulation(4, 0) == 1  # the whole batch in one forward
    assert accumulation(4, 2) == 2
    assert accumulation(4, 1) == 4
    assert accumulation(2, 4) == 1  # a micro-batch larger than the batch is the batch
    with pytest.raises(ValueError, match="--micro-batch 3 must divide the batch of 4"):
        accumulation(4, 3)
    with pytest.raises(ValueError, match="--micro-batch must be >= 0"):
        accumulation(4, -1)


def test_cli_refuses_a_micro_batch_that_does_not_divide(monkeypatch, capsys):
    import bench_train
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--lengths", "32768", "--tokens", "131072",
                                      "--micro-batch", "3"])
    with pytest.raises(SystemExit):
        bench_train.main()
    assert "--micro-batch 3 must divide the batch of 4" in capsys.readouterr().err
