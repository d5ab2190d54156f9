"""InfoNCE against a float64 NumPy reference written as an explicit loop over queries."""
import jax
import numpy as np
import pytest

from jaxllm.objectives.contrastive import info_nce_loss


def reference(q, c, tau, negatives=None, ids=None):
    """(loss, d loss / d q, accuracy) in float64: for query i the candidates are every batch context j
    except j != i holding i's context id, then i's own hard negatives."""
    q, c = q.astype(np.float64), c.astype(np.float64)
    B = len(q)
    losses, grad, correct = [], np.zeros_like(q), 0
    for i in range(B):
        cands = [c[j] for j in range(B) if j == i or ids is None or ids[j] != ids[i]]
        pos = [j for j in range(B) if j == i or ids is None or ids[j] != ids[i]].index(i)
        if negatives is not None:
            cands += list(negatives[i].astype(np.float64))
        cands = np.stack(cands)
        s = cands @ q[i] / tau
        p = np.exp(s - s.max())
        p /= p.sum()
        losses.append(-np.log(p[pos]))
        grad[i] = (p @ cands - cands[pos]) / (tau * B)
        correct += int(np.argmax(s) == pos)
    return np.mean(losses), grad, correct / B


def data(B=6, D=5, N=3, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=s).astype(np.float32) for s in ((B, D), (B, D), (B, N, D)))


CASES = {
    "in_batch": dict(tau=1.0),
    "temperature": dict(tau=0.07),
    "hard_negatives": dict(tau=0.5, negatives=True),
    "duplicates": dict(tau=0.3, ids=[4, 1, 4, 2, 1, 4]),
    "all": dict(tau=0.2, negatives=True, ids=[0, 0, 1, 2, 2, 3]),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(case):
    kw = CASES[case]
    q, c, n = data()
    negatives = n if kw.get("negatives") else None
    ids = np.asarray(kw["ids"]) if "ids" in kw else None
    ref_loss, ref_grad, ref_acc = reference(q, c, kw["tau"], negatives, ids)

    def loss_of(q_):
        return info_nce_loss(q_, c, temperature=kw["tau"], negatives_BND=negatives, context_ids_B=ids)

    (loss, aux), grad = jax.value_and_grad(loss_of, has_aux=True)(q)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)
    assert float(aux["accuracy"]) == pytest.approx(ref_acc)


def test_duplicate_masking_changes_the_loss():
    q, c, _ = data()
    c[2] = c[0]  # rows 0 and 2 share a context: unmasked, each counts the other's copy as a negative
    masked, _ = info_nce_loss(q, c, context_ids_B=np.asarray([7, 1, 7, 2, 3, 4]))
    unmasked, _ = info_nce_loss(q, c)
    assert float(masked) == pytest.approx(reference(q, c, 1.0, ids=[7, 1, 7, 2, 3, 4])[0], rel=1e-5)
    assert float(unmasked) > float(masked) + 1e-3


@pytest.mark.parametrize("n_neg", [0, 3])
def test_equal_scores_give_log_of_candidate_count(n_neg):
    B, D = 5, 4
    q, c = np.ones((B, D), np.float32), np.ones((B, D), np.float32)
    negatives = np.ones((B, n_neg, D), np.float32) if n_neg else None
    loss, _ = info_nce_loss(q, c, temperature=0.5, negatives_BND=negatives)
    assert float(loss) == pytest.approx(np.log(B + n_neg), rel=1e-6)


def test_bad_inputs():
    q, c, n = data()
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(q, c, temperature=0.0)
    with pytest.raises(ValueError, match="context_BD"):
        info_nce_loss(q, c[:3])
    with pytest.raises(ValueError, match="negatives_BND"):
        info_nce_loss(q, c, negatives_BND=n[:, :, :2])
    with pytest.raises(ValueError, match="context_ids_B"):
        info_nce_loss(q, c, context_ids_B=np.arange(3))
