import io

from pipelines.common import ray_data_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ray_data_progress_bars_only_on_a_terminal():
    from ray.data import DataContext

    context = DataContext.get_current()
    try:
        assert ray_data_progress(io.StringIO()) is False
        assert not context.enable_progress_bars and not context.enable_operator_progress_bars
        assert ray_data_progress(_Terminal()) is True
        assert context.enable_progress_bars and context.enable_operator_progress_bars
    finally:
        context.enable_progress_bars = context.enable_operator_progress_bars = True


def test_ray_address_is_the_flag_then_ray_address_then_a_fresh_local_ray(monkeypatch):
    from pipelines import common

    monkeypatch.setattr(common, "_address", None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert common.ray_address() == "local"  # never Ray's own fallback to /tmp/ray/ray_current_cluster
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert common.ray_address() == "http://10.0.0.1:8265"  # what `ray job submit` sets
    common.set_ray_address("127.0.0.1:6380")
    assert common.ray_address() == "127.0.0.1:6380"


def test_an_unreachable_address_fails_in_seconds_naming_it(monkeypatch):
    import socket
    import time

    import pytest

    from pipelines import common
    from pipelines.config import ConfigError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    started = time.time()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        common.check_reachable(f"ray://127.0.0.1:{port}")
    assert time.time() - started < common.REACHABLE_TIMEOUT_S + 2
    with pytest.raises(ConfigError, match="host:port"):
        common.check_reachable("somewhere")


def test_torch_threads_apply_in_the_worker_and_are_checked(torch_threads):
    import pytest
    import torch

    from pipelines.common import ScalingConfig, use_torch_threads

    use_torch_threads(ScalingConfig())  # null: Ray's default stays
    assert torch.get_num_threads() == torch_threads
    use_torch_threads(ScalingConfig(torch_threads=1))
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="scaling.torch_threads"):
        ScalingConfig(torch_threads=0)


def test_model_shape_reads_the_presets_sizes_without_loading(tiny_flux):
    """What the memory plan reads of tiny / shapes without a load equals the built transformers' configs."""
    from pipelines.common import model_shape
    from sfo.memory import transformer_parameters
    from sfo.shapes.model import build_shapes_pipeline

    shapes = build_shapes_pipeline()
    for name, transformer, pixels, text in [("tiny", tiny_flux.transformer, tiny_flux.pixel_multiple, tiny_flux.text_max_length),
                                            ("shapes", shapes.transformer, shapes.vae_scale_factor * 2, 16)]:
        shape = model_shape(name)
        assert {k: transformer.config[k] for k in shape.config} == shape.config, name
        assert (shape.pixels_per_token, shape.text_tokens) == (pixels, text), name
        assert shape.parameters == transformer_parameters(shape.config) == sum(p.numel() for p in transformer.parameters())
        assert not shape.large


def test_model_shape_of_the_flux1_layout_is_large():
    from pipelines.common import model_shape
    from tests.conftest import shared_path

    shape = model_shape(str(shared_path("data", "flux1-layout")))
    assert shape.pixels_per_token == 16 and shape.text_tokens == 512 and shape.large
    assert shape.parameters > 11e9


def test_a_fresh_local_ray_without_a_gpu_is_refused_and_a_joined_cluster_is_warned(monkeypatch, capsys):
    import pytest
    import ray

    from pipelines import common
    from pipelines.common import ScalingConfig, check_cluster_gpus
    from pipelines.config import ConfigError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(common, "_address", None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_cluster_gpus(ScalingConfig(), "sft")  # the CPU: nothing to check
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu: true, but the Ray cluster has 0 GPU.*scaling\.use_gpu=false"):
        check_cluster_gpus(ScalingConfig(use_gpu=True), "sft")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check_cluster_gpus(ScalingConfig(use_gpu=True), "sft")
    assert "waits until one joins" in capsys.readouterr().out
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 8.0})
    check_cluster_gpus(ScalingConfig(use_gpu=True), "sft")
    assert capsys.readouterr().out == ""


def test_gpu_memory_gib_is_checked():
    import pytest

    from pipelines.common import ScalingConfig

    with pytest.raises(ValueError, match=r"scaling\.gpu_memory_gib"):
        ScalingConfig(gpu_memory_gib=0)
