import dataclasses

import pytest

from skyjax.config import ConfigError, from_dict, load_config, to_dict
from skyjax.parallel.mesh import MeshConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-5
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    freeze: tuple[str, ...] = ()
    seed: int | None = None
    verbose: bool = False


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "name: rm\noptimizer:\n  lr: 1e-5\n  warmup_steps: 10\nfreeze: [vision]\n")
    cfg = load_config(RunConfig, p, ["optimizer.lr=3e-6", "mesh.shape=[2,2,2]", "seed=7", "verbose=true"])
    assert cfg.optimizer.lr == pytest.approx(3e-6)
    assert cfg.optimizer.warmup_steps == 10
    assert cfg.mesh.shape == (2, 2, 2)
    assert cfg.freeze == ("vision",)
    assert cfg.seed == 7 and cfg.verbose is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # frozen
    # round trip through plain dicts
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_unknown_key_named(tmp_path):
    p = write(tmp_path, "name: rm\noptimizer:\n  lr: 1e-5\n  warmup_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key optimizer\.warmup_step.*warmup_steps"):
        load_config(RunConfig, p)
    with pytest.raises(ConfigError, match=r"unknown config key optimiser"):
        load_config(RunConfig, write(tmp_path, "name: a\n"), ["optimiser.lr=1"])


def test_wrong_types_named(tmp_path):
    p = write(tmp_path, "name: rm\n")
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected a float, got str 'fast'"):
        load_config(RunConfig, p, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match=r"optimizer\.warmup_steps: expected an int, got float"):
        load_config(RunConfig, p, ["optimizer.warmup_steps=1.5"])
    with pytest.raises(ConfigError, match=r"verbose: expected true/false"):
        load_config(RunConfig, p, ["verbose=3"])
    with pytest.raises(ConfigError, match=r"optimizer\.betas: expected 2 items, got 3"):
        load_config(RunConfig, p, ["optimizer.betas=[0.9,0.99,0.1]"])
    with pytest.raises(ConfigError, match=r"missing required config key name"):
        load_config(RunConfig, write(tmp_path, "seed: 1\n"))
    with pytest.raises(ConfigError, match=r"not of the form dotted.key=value"):
        load_config(RunConfig, p, ["optimizer.lr"])


def test_validation_in_post_init_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"mesh.*at most one axis may be -1"):
        load_config(RunConfig, write(tmp_path, "name: a\nmesh:\n  shape: [-1, -1, 1]\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(RunConfig, write(tmp_path, "name: [unclosed\n"))
    # YAML is safe-loaded: a python tag is rejected, never executed
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(RunConfig, write(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))


@pytest.mark.parametrize("name,billions", [("qwen2_5_7b_text", 7.615), ("r1_distill_qwen_32b", 32.764)])
def test_model_configs_load_and_have_the_published_size(name, billions):
    """The shipped model YAMLs load into the model config, and the abstract model (no weights allocated) has the
    published parameter count: Qwen2.5-VL-7B is 8.292B with a 676.6M vision tower; Qwen2.5-32B is 32.76B."""
    from pathlib import Path

    from skyjax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
    from skyjax.nn.functional import Functional

    path = Path(__file__).resolve().parents[1] / "configs" / "models" / f"{name}.yaml"
    cfg = load_config(Qwen2Config, path)
    fn = Functional.create(lambda r: Qwen2ForCausalLM(cfg, rngs=r))
    assert fn.num_params() / 1e9 == pytest.approx(billions, abs=0.005)


def test_every_shipped_run_config_loads():
    from pathlib import Path

    from skyjax.train.config import RunConfig

    from skyjax.train.iterate_config import IterateConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    iterate = root / "demo/iterative_sft.yaml"  # `skyjax iterate`'s config: an SFT run section and the rounds
    paths = sorted(set(root.glob("demo/*.yaml")) - {iterate}) + sorted(root.glob("reward_model/*.yaml"))
    assert len(paths) >= 5
    kinds = {}
    for path in paths:
        kinds[path.name] = load_config(RunConfig, path).kind
    assert kinds.pop("mpo.yaml") == "mpo"  # the MPO demo (its earlier stages in its `demo` section)
    assert kinds.pop("grpo.yaml") == "grpo"  # the GRPO demo (its warm start in its `demo` section)
    assert set(kinds.values()) == {"reward_model"}, kinds
    assert load_config(IterateConfig, iterate).sft.kind == "sft"
    stage1 = load_config(RunConfig, root / "reward_model/stage1_7b.yaml")
    stage2 = load_config(RunConfig, root / "reward_model/stage2_7b.yaml")
    assert (stage1.optimizer.lr, stage2.optimizer.lr) == (1e-5, 1e-6)  # the paper's two stages
    assert "vision" in stage1.trainer.freeze and len(stage2.data.train) == 2
