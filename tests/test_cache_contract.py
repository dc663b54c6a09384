"""EvictingKVCache follows mlx-lm 0.32's cache protocol: mlx-lm's own save_prompt_cache /
load_prompt_cache carry a compressed cache (quantized rows, padding, hybrid families), and
decoding after the round trip equals decoding without it."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

import ckv_mlx  # noqa: F401  (registers the cache class with mlx-lm)
from ckv_mlx.chat import session_file
from ckv_mlx.chat.session_file import SavedSession
from ckv_mlx.kv.cache import EvictingKVCache
from ckv_mlx.errors import CKVError
from ckv_mlx.policy.methods import make_method
from ckv_mlx.kv.quantized import KVBits
from ckv_mlx.engine.session import Session
from fakes import fake_profile
from tiny import TinyTokenizer, tiny_model


def tokens(n, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(1, 128, (n,)).tolist()


def compressed(arch="llama", method="compresskv-gqa", bits=None, dtype=mx.float32):
    model = tiny_model(arch, layers=4, head_dim=32)
    model.set_dtype(dtype)
    session = Session(model, TinyTokenizer(), make_method(method, fake_profile(model))[0], region=16,
                      kv_bits=KVBits(bits, 32) if bits else None)
    session.prefill(tokens(120))
    session.compress(40)
    return model, session


def decoded(model, caches, forced):
    return [model(mx.array([[t]]), cache=caches)[:, -1] for t in forced]


@pytest.mark.parametrize("arch, method, bits, dtype", [
    ("llama", "compresskv-gqa", None, mx.float32),
    ("llama", "compresskv", 8, mx.float32),
    ("qwen2", "snapkv-ada", None, mx.float32),  # padding rows: per-head budgets
    ("llama", "compresskv-gqa+span8", 8, mx.bfloat16),
    ("gemma3_text", "snapkv", None, mx.float32),  # hybrid: mlx-lm's RotatingKVCache beside ours
])
def test_mlx_lm_save_and_load_prompt_cache_continue_token_for_token(tmp_path, arch, method, bits, dtype):
    model, session = compressed(arch, method, bits, dtype)
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, session.model_caches(), {"method": method})
    loaded, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata == {"method": method}
    ours = [c for c in loaded if isinstance(c, EvictingKVCache)]
    assert len(ours) == len(session.caches) and all(c.compressed for c in ours)
    assert all(c.keys.shape[2] == c.length - c.packed_rows for c in ours)  # the file holds rows, not free capacity
    forced = tokens(10, seed=3)  # within the region: no re-score needed
    for a, b in zip(decoded(model, loaded, forced), decoded(model, session.model_caches(), forced)):
        assert mx.array_equal(a, b)
    assert [c.nbytes for c in ours] == [c.nbytes for c in session.caches]  # the same capacity once it grows


def test_state_is_arrays_and_scalars_and_from_state_takes_one_argument():
    _, session = compressed(bits=8)
    cache = session.caches[0]
    state = cache.state
    assert [type(x) for x in state[5:]] == [int] * 5
    assert state[5:] == [cache.offset, cache.budget, 16, 8, 32]
    again = EvictingKVCache.from_state(state)
    assert (again.offset, again.length, again.budget, again.kv_bits) == (cache.offset, cache.length, cache.budget, KVBits(8, 32))
    for a, b in zip(again.keys_and_values(), cache.keys_and_values()):
        assert mx.array_equal(a, b)


def test_keys_and_values_are_the_rows_held_as_mlx_lm_returns_them():
    ours, theirs = EvictingKVCache(), KVCache()
    keys, values = mx.random.normal((1, 2, 37, 16)), mx.random.normal((1, 2, 37, 16))
    ours.update_and_fetch(keys, values)
    theirs.update_and_fetch(keys, values)
    for a, b in zip(ours.keys_and_values(), theirs.keys_and_values()):
        assert mx.array_equal(a, b)
    assert (ours.size(), ours.empty(), ours.is_trimmable()) == (theirs.size(), theirs.empty(), True)


def test_an_empty_cache_round_trips():
    again = EvictingKVCache.from_state(EvictingKVCache().state)
    assert again.empty() and again.offset == 0 and again.length == 0


def test_a_session_file_of_the_old_layout_is_refused_in_one_line(tmp_path):
    _, session = compressed()
    path = tmp_path / "old.safetensors"
    old = '{"format": "%s", "layers": [["1"]]}' % session_file.SESSION_FORMAT
    mx.save_safetensors(str(path), {"cache.0.0": mx.zeros((1, 2, 4, 16))}, metadata={"ckv": old})
    with pytest.raises(CKVError, match="older ckv-mlx") as info:
        session_file.read(path)
    assert "\n" not in str(info.value)
    session_file.write(tmp_path / "new.ckv", SavedSession({"model": "tiny"}, session.caches, [None] * 2, {}))
    saved = session_file.read(tmp_path / "new.ckv")
    assert saved.metadata["model"] == "tiny" and [c.length for c in saved.caches] == [c.length for c in session.caches]


def test_a_mask_made_from_another_layers_length_is_made_again_from_this_ones():
    from mlx_lm.models.base import create_causal_mask, scaled_dot_product_attention

    from ckv_mlx.kv.attention import attention

    mx.random.seed(3)
    queries, keys, values = (mx.random.normal((1, 2, n, 8)) for n in (4, 20, 20))
    short = EvictingKVCache()
    short.update_and_fetch(keys, values)  # this layer holds 20 rows; the first layer held 30
    wrong = create_causal_mask(4, 26)
    expected = scaled_dot_product_attention(queries, keys, values, None, scale=0.3, mask=create_causal_mask(4, 16))
    assert mx.allclose(attention(queries, keys, values, short, 0.3, wrong), expected).item()
