"""The default KV limit: a Metal GPU's recommended working set, MLX's memory limit elsewhere."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from ckv_mlx.engine import memory

GB = 10**9
METAL_16GB = {"architecture": "applegpu_g14g", "device_name": "Apple M2", "memory_size": 16 * GB,
              "max_buffer_length": 8 * GB, "max_recommended_working_set_size": 11_800_000_000}
CPU = {"architecture": "x86_64", "device_name": "Intel(R) Xeon(R) Processor"}


@pytest.fixture
def device(monkeypatch):
    """Fake the device: its info and MLX's memory limit (1.5x the working set on Metal)."""
    def fake(info: dict, limit: int):
        monkeypatch.setattr(mx, "device_info", lambda *a: info)
        monkeypatch.setattr(mx, "get_memory_limit", lambda: limit)
    return fake


def test_a_16gb_mac_keeps_the_cache_inside_the_recommended_working_set(device, monkeypatch):
    device(METAL_16GB, 17_700_000_000)
    monkeypatch.setattr(memory, "weight_bytes", lambda model: 4_500_000_000)  # an 8B model, 4-bit
    limit = memory.default_kv_limit(None)
    assert limit == 4_350_000_000  # 0.75 x 11.8 GB - 4.5 GB, by hand
    assert limit + 4_500_000_000 < 11_800_000_000  # weights + cache fit; 0.75 x 17.7 - 4.5 = 8.8 GB did not


def test_a_cpu_keeps_mlx_memory_limit_rule(device):
    device(CPU, 20 * GB)
    model = nn.Linear(1000, 500, bias=False)  # 500,000 float32 weights: 2,000,000 bytes
    assert memory.default_kv_limit(model) == 15 * GB - 2_000_000  # 0.75 x 20 GB - weights
