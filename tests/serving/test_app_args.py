"""``build_app``'s resolved options without Ray: SFO_SERVE_* environment variables over ``args``, GPUs.

``build_app`` only binds deployments, so the bound Application is inspected directly: the Ingress's
first init arg is the FluxGenerator Application, whose init args are (model, adapters, device, dtype,
max_batch_images, fuse_adapters, adapter_sets, max_adapter_sets, seconds_per_unit), whose
``ray_actor_options`` carry the GPUs and whose ``autoscaling_config`` the max_replicas.
"""

from __future__ import annotations

import pytest

from serving.app import ENV_OVERRIDES, TOKEN_ENV, build_app
from serving.replica import DOWNSCALE_DELAY_S, GENERATOR_ACTOR_OPTIONS, UPSCALE_DELAY_S

ARGS = {"model": "tiny", "adapters": "/nowhere/adapters"}


@pytest.fixture(autouse=True)
def _no_serve_env(monkeypatch):
    """Whatever the shell running the tests exports, each test starts without the SFO_SERVE_* variables."""
    for var in (*ENV_OVERRIDES.values(), TOKEN_ENV):
        monkeypatch.delenv(var, raising=False)


def _generator(args: dict):
    """(FluxGenerator's bind args, its ray_actor_options) of the app ``build_app(args)`` returns."""
    generator = _bound(args)[0]
    assert generator.name == "FluxGenerator"
    return generator.init_args, generator.ray_actor_options


def _bound(args: dict):
    """(the bound FluxGenerator deployment, the Ingress's init args)."""
    ingress = build_app(args)._bound_deployment
    return ingress.init_args[0]._bound_deployment, ingress.init_args


def test_args_alone_give_the_laptop_defaults():
    init_args, actor = _generator(ARGS)
    assert init_args[:2] == ("tiny", "/nowhere/adapters")
    assert init_args[4:] == (8, None, {}, 2, 0.25)  # max_batch_images, fuse_adapters (None: by size), adapter sets
    assert _generator({**ARGS, "fuse_adapters": False})[0][5] is False
    assert actor == GENERATOR_ACTOR_OPTIONS == {"num_cpus": 0.5}  # CPU only: no num_gpus key at all
    generator, (_, limits, adapter_sets, token) = _bound(ARGS)
    assert generator._deployment_config.autoscaling_config.max_replicas == 2
    assert generator._deployment_config.autoscaling_config.min_replicas == 1
    assert generator._deployment_config.autoscaling_config.upscale_delay_s == UPSCALE_DELAY_S
    assert generator._deployment_config.autoscaling_config.downscale_delay_s == DOWNSCALE_DELAY_S
    assert limits.deadlines.request_timeout_s == 600 and adapter_sets == () and token is None


def test_max_replicas_from_the_environment_and_adapter_sets(monkeypatch):
    monkeypatch.setenv("SFO_SERVE_MAX_REPLICAS", "8")
    generator, (_, _, adapter_sets, _) = _bound({**ARGS, "adapter_sets": {"v2": "/runs/v2/adapters"},
                                                 "max_adapter_sets_per_replica": 3})
    assert generator._deployment_config.autoscaling_config.max_replicas == 8
    monkeypatch.setenv("SFO_SERVE_MIN_REPLICAS", "3")
    assert _bound(ARGS)[0]._deployment_config.autoscaling_config.min_replicas == 3
    monkeypatch.setenv("SFO_SERVE_MIN_REPLICAS", "9")  # above max_replicas: refused naming both and the fix
    with pytest.raises(ValueError, match=r"min_replicas \(9\) is above max_replicas \(8\).*SFO_SERVE_MIN_REPLICAS"):
        build_app(ARGS)
    monkeypatch.delenv("SFO_SERVE_MIN_REPLICAS")
    assert generator.init_args[6:8] == ({"v2": "/runs/v2/adapters"}, 3)
    assert adapter_sets == ("v2",)
    for bad in ("default", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="adapter_sets"):
            build_app({**ARGS, "adapter_sets": {bad: "/x"}})
    monkeypatch.setenv("SFO_SERVE_MAX_REPLICAS", "0")
    with pytest.raises(ValueError, match="SFO_SERVE_MAX_REPLICAS"):
        build_app(ARGS)


def test_token_travels_as_its_sha256_only(monkeypatch):
    import hashlib

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    _, (_, _, _, token) = _bound(ARGS)
    assert token == hashlib.sha256(b"s3cret").hexdigest()


def test_deadline_rule_is_validated_with_the_args():
    with pytest.raises(ValueError, match="base_s"):
        build_app({**ARGS, "deadline_base_s": 700, "request_timeout_s": 600})
    with pytest.raises(ValueError, match="seconds_per_unit"):
        build_app({**ARGS, "seconds_per_unit": 0})


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


def test_adapter_folders_given_as_uris_pass_as_they_are_and_other_schemes_are_refused():
    """An s3:// or gs:// folder reaches the replicas unchanged (each downloads it; Path() would fold 's3://' to
    's3:/'); a scheme no filesystem serves fails naming the field."""
    init_args, _ = _generator({**ARGS, "adapters": "s3://bucket/runs/adapters",
                               "adapter_sets": {"v2": "gs://bucket/v2/adapters"}})
    assert init_args[1] == "s3://bucket/runs/adapters" and init_args[6] == {"v2": "gs://bucket/v2/adapters"}
    with pytest.raises(ValueError, match=r"serving args: adapters: .*'ftp'"):
        build_app({**ARGS, "adapters": "ftp://host/adapters"})
    with pytest.raises(ValueError, match=r"adapter_sets\.v2: .*names no bucket"):
        build_app({**ARGS, "adapter_sets": {"v2": "s3:///adapters"}})
