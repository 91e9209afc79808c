"""The real vLLM engine's top-K agrees with the transformers oracle (exact fp32 logits), on
SmolLM2 (an untied random model is compared the same way in the 201,088-id test).

Ids must match wherever the log-prob gap to the next candidate outside the top-K exceeds
fp32 noise; log-probs within 1e-3; the actual token's log-prob within 1e-3. One engine per
model: SmolLM2's is the run's shared engine (conftest.py); `_compare` without one starts
and closes its own (engine start is ~30 s on this CPU)."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from sparsekd.cache_builder.corpus import builtin_documents
from sparsekd.cache_builder.engines import HfEngine, VllmEngine
from sparsekd.cache_builder.teacher import TeacherConfig

K = 8
NOISE = 2e-3  # nats: below this gap two candidates may swap between engines


def _sequences(model_dir, L=48, n=6):
    from sparsekd.cache_builder.packing import pack

    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = list(pack([t for _, t in builtin_documents()], tok, tok.eos_token_id, L, limit=n))
    return [s[0] for s in seqs], [s[1] for s in seqs]


def _compare(model_dir, engine=None):
    ids, nxt = _sequences(model_dir)
    oracle = HfEngine(TeacherConfig(path=str(model_dir), engine="hf"), k=K + 1, seq_len=48)
    hf = oracle.run(ids, nxt)
    eng = engine or VllmEngine(TeacherConfig(path=str(model_dir)), k=K, seq_len=48)
    try:
        vl = eng.run(ids, nxt, k=K)
    finally:
        if engine is None:
            eng.close()
    compared = 0
    for b in range(len(ids)):
        np.testing.assert_allclose(vl.token_logprobs[b], hf.token_logprobs[b], atol=1e-3)
        for p in range(len(ids[b])):
            # the oracle ran with K + 1 to know the gap between rank K and rank K + 1
            lp_ref = np.sort(hf.topk_logprobs[b][p])[::-1]
            order = np.argsort(-hf.topk_logprobs[b][p], kind="stable")
            ref_ids = hf.topk_ids[b][p][order]
            gaps = -np.diff(lp_ref)
            if gaps[K - 1] < NOISE:  # the K-th and K+1-th are a tie within noise
                continue
            v_ids, v_lp = vl.topk_ids[b][p], vl.topk_logprobs[b][p]
            assert np.all(np.diff(v_ids) > 0), "ids must be sorted and distinct"
            assert set(v_ids.tolist()) == set(ref_ids[:K].tolist()), (b, p)
            ref_by_id = dict(zip(ref_ids.tolist(), lp_ref.tolist()))
            np.testing.assert_allclose(v_lp, [ref_by_id[i] for i in v_ids.tolist()], atol=1e-3)
            compared += 1
    assert compared > 0.9 * sum(len(x) for x in ids)


@pytest.mark.slow
@pytest.mark.xdist_group("vllm")
def test_vllm_topk_matches_hf_on_smollm2(smollm2_dir, smollm2_engine):
    _compare(smollm2_dir, smollm2_engine)
