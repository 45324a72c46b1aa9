"""TransNormerLLM.generate: float64 models, nucleus sampling, EOS stopping, streaming."""
import pytest
import torch

from seqpar.models import TNLConfig, TransNormerLLM


def tiny(**kw):
    torch.manual_seed(0)
    return TransNormerLLM(TNLConfig.preset("tiny", attn_backend="torch", **kw))


def test_generate_float64_matches_forward():
    m = tiny().double().eval()
    prompt = torch.randint(0, 256, (2, 9))
    gen, logits = m.generate(prompt, 6, temperature=0, return_logits=True)
    assert gen.shape == (2, 15) and logits.dtype == torch.float64
    full = m(gen).logits
    torch.testing.assert_close(logits, full[:, 8:-1], rtol=0, atol=1e-10)


def test_top_p():
    m = tiny().eval()
    prompt = torch.randint(0, 256, (2, 5))
    greedy = m.generate(prompt, 6, temperature=0)
    # a nucleus smaller than the top token's probability keeps only the top token
    assert torch.equal(m.generate(prompt, 6, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0)), greedy)
    # the kept set is the shortest prefix of the sorted probabilities that reaches top_p
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -9.0]])
    p = torch.softmax(logits, -1)[0]
    top_p = float(p[0] + p[1]) - 1e-4  # needs the two most likely tokens
    draws = {int(TransNormerLLM._sample(logits, 1.0, None, torch.Generator().manual_seed(s), top_p)) for s in range(200)}
    assert draws == {0, 1}
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="top_p"):
            m.generate(prompt, 2, top_p=bad)


def test_eos_stops_and_streams():
    m = tiny().eval()
    prompt = torch.randint(0, 256, (1, 5))
    greedy = m.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 7])  # the third new token
    streamed = []
    out = m.generate(prompt, 10, temperature=0, eos_id=eos, on_token=lambda t: streamed.append(int(t[0])))
    first = (greedy[0, 5:] == eos).nonzero()[0, 0].item()
    assert torch.equal(out, greedy[:, : 5 + first + 1])
    assert streamed == out[0, 5:].tolist()
    # a finished sequence of a batch is padded with eos while the other continues
    two = torch.cat([prompt, torch.randint(0, 256, (1, 5))])
    out2 = m.generate(two, 10, temperature=0, eos_id=eos)
    row = out2[0, 5:]
    hit = (row == eos).nonzero()
    if len(hit):
        assert (row[hit[0, 0]:] == eos).all()
    with pytest.raises(ValueError, match="eos_id"):
        m.generate(prompt, 2, eos_id=256)
