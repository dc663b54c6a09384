"""With nothing to evict, every method must reproduce plain mlx-lm exactly."""

import mlx.core as mx
import pytest

from ckv_mlx.policy.methods import METHODS, make_method
from ckv_mlx.engine.session import Session
from tiny import FAMILIES, TinyTokenizer, plain_logits, session_logits, tiny_model
from fakes import fake_profile

STEPS = 20


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_budget_at_least_prompt_matches_plain_mlx_lm(arch, name):
    mx.random.seed(1)
    prompt = mx.random.randint(1, 128, (48,)).tolist()
    forced = mx.random.randint(1, 128, (STEPS,)).tolist()
    reference = plain_logits(tiny_model(arch), prompt, forced)

    model = tiny_model(arch)
    method, _ = make_method(name, fake_profile(model))
    session = Session(model, TinyTokenizer(), method, region=STEPS)  # room for every forced token
    ours = session_logits(session, prompt, forced)
    for step, (a, b) in enumerate(zip(reference, ours)):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5), f"{arch}/{name} differs at step {step}"
