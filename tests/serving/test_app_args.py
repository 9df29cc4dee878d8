"""``build_app``'s resolved options without Ray: SFO_SERVE_* environment variables over ``args``, GPUs.

``build_app`` only binds deployments, so the bound Application is inspected directly: the Ingress's
first init arg is the FluxGenerator Application, whose init args are (model, adapters, device, dtype,
max_batch_images, fuse_adapters) and whose ``ray_actor_options`` carry the GPUs.
"""

from __future__ import annotations

import pytest

from serving.app import ENV_OVERRIDES, GENERATOR_ACTOR_OPTIONS, build_app

ARGS = {"model": "tiny", "adapters": "/nowhere/adapters"}


@pytest.fixture(autouse=True)
def _no_serve_env(monkeypatch):
    """Whatever the shell running the tests exports, each test starts without the SFO_SERVE_* variables."""
    for var in ENV_OVERRIDES.values():
        monkeypatch.delenv(var, raising=False)


def _generator(args: dict):
    """(FluxGenerator's bind args, its ray_actor_options) of the app ``build_app(args)`` returns."""
    ingress = build_app(args)._bound_deployment
    generator = ingress.init_args[0]._bound_deployment
    assert generator.name == "FluxGenerator"
    return generator.init_args, generator.ray_actor_options


def test_args_alone_give_the_laptop_defaults():
    init_args, actor = _generator(ARGS)
    assert init_args[:2] == ("tiny", "/nowhere/adapters")
    assert init_args[4:] == (8, True)  # max_batch_images, fuse_adapters
    assert _generator({**ARGS, "fuse_adapters": False})[0][5] is False
    assert actor == GENERATOR_ACTOR_OPTIONS == {"num_cpus": 0.5}  # CPU only: no num_gpus key at all


def test_gpus_per_replica_arg_adds_num_gpus():
    _, actor = _generator({**ARGS, "gpus_per_replica": 0.5})
    assert actor == {"num_cpus": 0.5, "num_gpus": 0.5}


def test_environment_overrides_args(monkeypatch):
    monkeypatch.setenv("SFO_SERVE_MODEL", "/models/FLUX.1-dev")
    monkeypatch.setenv("SFO_SERVE_ADAPTERS", "/runs/train/sfo/adapters")
    monkeypatch.setenv("SFO_SERVE_GPUS_PER_REPLICA", "1")
    init_args, actor = _generator({**ARGS, "gpus_per_replica": 2})  # the variable wins over the arg
    assert init_args[:2] == ("/models/FLUX.1-dev", "/runs/train/sfo/adapters")
    assert actor == {"num_cpus": 0.5, "num_gpus": 1.0}


def test_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("SFO_SERVE_MODEL", "")
    monkeypatch.setenv("SFO_SERVE_GPUS_PER_REPLICA", " ")
    init_args, actor = _generator(ARGS)
    assert init_args[0] == "tiny" and "num_gpus" not in actor


@pytest.mark.parametrize("value", ["one", "-1", "nan", "inf"])
def test_bad_gpu_variable_raises_naming_it(monkeypatch, value):
    monkeypatch.setenv("SFO_SERVE_GPUS_PER_REPLICA", value)
    with pytest.raises(ValueError, match="SFO_SERVE_GPUS_PER_REPLICA"):
        build_app(ARGS)


def test_bad_gpu_arg_raises_naming_the_field_not_a_variable():
    with pytest.raises(ValueError, match="gpus_per_replica") as caught:
        build_app({**ARGS, "gpus_per_replica": -1})
    assert "SFO_SERVE" not in str(caught.value).split(":")[1]  # the bad value came from args, not the environment
