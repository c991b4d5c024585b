"""Every command in README.md works as written (with a tiny checkpoint and tiny sizes substituted), so the README
cannot drift from the code again.

The commands are the lines of the README's ```bash blocks and its inline `python src/...` spans. Each one gets a
plan by its form; a command no rule recognises fails the test (add a rule, or an exemption with its reason). The
fast suite composes every command's config and runs the sampling and evaluation commands; ``make test-all`` runs
the training commands, multiruns, torchrun and the Makefile targets too (``slow``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from difflab.tasks.analytic import analytic
from difflab.tasks.encode import encode
from difflab.tasks.eval import evaluate
from difflab.tasks.export import export
from difflab.tasks.sample import sample
from difflab.tasks.stream import stream
from difflab.tasks.train import train
from tests.conftest import ROOT, TINY, compose_config
from tests.integration.test_classifier_guidance import TINY_CLASSIFIER

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_readme_commands")

README = ROOT / "README.md"
SCRIPTS = {"train.py": ("train", train), "sample.py": ("sample", sample), "eval.py": ("eval", evaluate)}
SCRIPTS["export.py"] = ("export", export)
SCRIPTS["encode.py"] = ("encode", encode)
SCRIPTS["stream.py"] = ("stream", stream)
SCRIPTS["analytic.py"] = ("analytic", analytic)
# Commands that are not run, with the reason (they are still composed where they are difflab commands).
EXEMPT = {
    "make test": "the command that runs this test",
    "srun": "needs a SLURM cluster (its overrides are composed)",
    "hydra/launcher=submitit_slurm": "submits SLURM jobs (its overrides are composed)",
    "--rdzv-id": "a multi-node torchrun job: run on two localhost 'nodes' by tests/integration/test_multinode.py "
    "(its overrides are composed)",
    "src/export.py": "run by tests/integration/test_export.py on a checkpoint whose UNet maps onto diffusers' "
    "(TINY's 16-channel levels with 32 groups do not; its overrides are composed here)",
}
# Tiny sizes for training commands, each applied only where the composed config has the key.
TINY_SIZES = {
    "net.model_channels": "16",
    "net.channel_mult": "[1,2]",
    "net.num_heads": "2",
    "net.num_head_channels": "-1",
    "schedule.num_timesteps": "20",
    "sampler.steps": "5",
    "trainer.max_steps": "2",
    "trainer.limit_train_batches": "2",
    "trainer.limit_val_batches": "1",
    "trainer.val_check_interval": "1.0",
    "trainer.check_val_every_n_epoch": "1",
    "trainer.num_sanity_val_steps": "0",
    "trainer.enable_progress_bar": "false",
    "trainer.enable_model_summary": "false",
    "data.batch_size": "16",
    "data.val_size": "32",
    "samples.num_samples": "2",
    "callbacks.sample_grid.num_samples": "2",
    "callbacks.nll.num_images": "4",
    "callbacks.nll.every_n_epochs": "1",
    "callbacks.generative_metrics.num_samples": "8",
    "callbacks.generative_metrics.num_real": "16",
    "callbacks.generative_metrics.batch_size": "8",
    "callbacks.generative_metrics.kid_subset_size": "4",
    "callbacks.reconstruction_metrics.max_batches": "1",
    "autoencoder.ch": "8",
    "autoencoder.num_groups": "4",
    "model.discriminator.ch": "8",
    "model.discriminator.num_groups": "4",
    "conditioner.context_dim": "16",
    "conditioner.width": "16",
    "data.num_pairs": "48",  # experiment=reflow: 48 pairs of a 2-step teacher ODE
    "data.teacher_steps": "2",
    "model.start_steps": "8",  # experiment=progressive_distill: 8 → 4 → 2 steps (within the tiny T = 20), one
    "model.steps_per_round": "1",  # optimizer step per round (trainer.max_steps=2 runs both rounds)
    "model.aug_levels": "10",  # the upscaler's augmentation levels must fit in the tiny T = 20
    "model.sample_aug_level": "2",
}
# Tiny sizes for the writers (encode.py, stream.py), on digits in place of Fashion-MNIST.
WRITER_SIZES = ["data.limit_train_size=64", "data.val_size=32"]
# Tiny sizes for sampling and evaluation (these keys always exist).
SAMPLE_SIZES = {"num_samples": "4", "batch_size": "4", "num_interp": "3", "sampler.steps": "5"}
EVAL_SIZES = {"num_samples": "8", "num_real": "16", "batch_size": "8", "nll_images": "4", "sampler.steps": "5"}
EVAL_SIZES["reconstruct_images"] = "4"
EVAL_SIZES |= {"ode_nll_images": "2", "ode_nll_rtol": "1e-2", "ode_nll_atol": "1e-2"}


def readme_commands() -> list[str]:
    """The README's commands: ```bash block lines (continuations joined, comments and blank lines dropped, SLURM
    #SBATCH lines skipped) and inline `python src/...` spans."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if command:
                commands.append(" ".join(command.split()))
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [span for span in re.findall(r"`(python src/[^`]+)`", outside)]
    return list(dict.fromkeys(commands))


@dataclass
class Plan:
    command: str
    how: str  # run | subprocess | compose | exempt
    script: str | None = None
    args: list[str] = field(default_factory=list)
    reason: str = ""


def plan(command: str) -> Plan:
    for marker, reason in EXEMPT.items():
        if command.startswith(marker) or marker in command.split():
            tokens = shlex.split(command)
            script_at = next((i for i, t in enumerate(tokens) if t.startswith("src/")), None)
            if script_at is None:
                return Plan(command, "exempt", reason=reason)
            args = [a for a in tokens[script_at + 1 :] if a != "-m"]
            return Plan(command, "compose", Path(tokens[script_at]).name, args, reason)
    tokens = shlex.split(command)
    if tokens[0] in ("make", "torchrun"):
        return Plan(command, "subprocess")
    if (
        tokens[:1] == ["python"]
        and len(tokens) > 1
        and Path(tokens[1]).name in SCRIPTS
        and tokens[1].startswith("src/")
    ):
        script, args = Path(tokens[1]).name, tokens[2:]
        ddp = any(a in ("trainer=ddp", "trainer=ddp_cpu", "trainer=fsdp", "trainer=fsdp_cpu") for a in args)
        ddp = ddp and "plan=true" not in args  # a memory plan launches nothing
        if "-m" in args or "--cfg" in args or "--help" in args or ddp:
            return Plan(command, "subprocess", script, args)
        return Plan(command, "run", script, args)
    raise AssertionError(f"README command without a rule in {__file__}: {command!r}")


PLANS = [plan(c) for c in readme_commands()]


def test_the_readme_has_the_commands_this_test_knows():
    assert len(PLANS) >= 30
    kinds = {p.how for p in PLANS}
    assert kinds == {"run", "subprocess", "compose", "exempt"}, kinds
    assert any("'~sampler' sampler.steps=50" in p.command for p in PLANS)  # issue 21's case


# ------------------------------------------------------------------ substitution


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint, tiny_cfg_checkpoint, tiny_upscaler_checkpoint) -> dict[str, str]:
    """Tiny checkpoints to stand in for `ckpt=...`: unconditional, class-conditional, an upscaler (the session's),
    rectified flow, EDM, text-conditioned latent; a noisy classifier for `classifier_ckpt=...`; and the input files of
    the editing modes."""
    made = {"ddpm": tiny_checkpoint, "cfg": tiny_cfg_checkpoint, "upscaler": tiny_upscaler_checkpoint}
    common = [*TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0"]
    edm_common = [o for o in common if not o.startswith("schedule.")]  # a σ process has no discrete T
    for kind, extra in {
        "flow": ["model=rectified_flow"],
        "edm": ["model=edm"],
        "text": [
            "model=ldm",
            "conditioner=text_transformer",
            "data.image_size=32",  # the shipped stage 1 (Fashion-MNIST 32x32)
            "net.num_heads=2",
            "net.num_head_channels=-1",
        ],
    }.items():
        out = tmp_path_factory.mktemp(kind)
        made[kind] = train(compose_config([*(edm_common if kind == "edm" else common), *extra], out))["checkpoint"]
    from tests.integration.test_ldm import AE_TINY

    autoencoder = [*AE_TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2"]
    made["autoencoder"] = train(compose_config(autoencoder, tmp_path_factory.mktemp("ae")))["checkpoint"]
    made["classifier"] = train(compose_config(TINY_CLASSIFIER, tmp_path_factory.mktemp("classifier")))["checkpoint"]
    # the data of data=latents and data=streaming: digits at the commands' sizes, encoded / written once
    for kind, script, size in (("latents", "encode.py", 32), ("shards", "stream.py", 16)):
        out = tmp_path_factory.mktemp(kind)
        overrides = ["data=digits", f"data.image_size={size}", *WRITER_SIZES, f"out_dir={out / kind}"]
        config, task = SCRIPTS[script]
        task(compose_config(overrides, out, config))
        made[kind] = str(out / kind)
    # Analytic-DPM's Γ beside the unconditional checkpoint (what `python src/analytic.py ckpt=...` writes), so the
    # `sampler.variance_type=analytic` commands do not depend on the order the commands run in
    analytic(compose_config([f"ckpt={tiny_checkpoint}", "num_samples=4"], tmp_path_factory.mktemp("gamma"), "analytic"))
    # few-step students of the tiny DDPM (README's ckpt=logs/progressive_distill/... and logs/consistency_distill/...)
    made.update(few_step_students(tmp_path_factory, tiny_checkpoint, made["text"], tiny_cfg_checkpoint, common))
    # inputs of the editing modes (image=, mask=): a 20x12 image and a mask of its size
    inputs = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name, pixels in {"image": rng.random((12, 20)) * 255, "mask": (rng.random((12, 20)) > 0.5) * 255}.items():
        Image.fromarray(pixels.astype(np.uint8)).save(inputs / f"{name}.png")
        made[name] = str(inputs / f"{name}.png")
    return made


def few_step_students(
    tmp_path_factory, teacher: str, latent_teacher: str, cfg_teacher: str, common: list[str]
) -> dict[str, str]:
    """A progressive-distillation round checkpoint and a consistency-distillation checkpoint of ``teacher`` (the tiny
    DDPM), a latent consistency student of ``latent_teacher`` (the tiny text LDM), a guidance-distilled round
    checkpoint of ``cfg_teacher`` (the tiny class-conditional model)."""
    made = {}
    rounds = ["model.start_steps=8", "model.steps_per_round=1"]
    for kind, extra in {
        "progressive": ["experiment=progressive_distill", *rounds],
        "consistency": ["experiment=consistency_distill"],
        "latent_consistency": ["experiment=latent_consistency", "model.skip=2"],
        "guidance": ["experiment=guidance_distill", *rounds, "model.guidance_steps=1"],  # stage one, round 0
    }.items():
        out = tmp_path_factory.mktemp(kind)
        taught = {"latent_consistency": latent_teacher, "guidance": cfg_teacher}.get(kind, teacher)
        overrides = [*common, *extra, f"model.teacher_ckpt={taught}", "samples.num_samples=2"]
        overrides = [o for o in overrides if not o.startswith(("net", "schedule.", "data.image_size"))]  # the teacher's
        checkpoint = train(compose_config(overrides, out))["checkpoint"]
        rounds = sorted(Path(checkpoint).parent.glob("round_*steps.ckpt"))
        made[kind] = str(rounds[-1] if rounds else checkpoint)
    return made


def substitute(script: str, args: list[str], checkpoints: dict[str, str]) -> list[str]:
    """The command's arguments with the machine (GPU → CPU), the checkpoint and the sizes made tiny."""
    kind = "text" if any(a.startswith("prompt=") for a in args) else "ddpm"
    if any(a.startswith(("guidance_scale=", "classes=")) for a in args) and kind != "text":
        kind = "cfg"
    if any(a.startswith("sampler=flow_") or "straightness" in a for a in args):  # a rectified flow's checkpoint
        kind = "flow"
    if "ckpt=edm.ckpt" in args:  # the README's name for an EDM-family checkpoint
        kind = "edm"
    for student in ("progressive_", "consistency_", "latent_consistency/", "guidance_"):  # ckpt=logs/<experiment>/...
        if any(a.startswith(("ckpt=", "ckpt_path=")) and f"/{student}" in a for a in args):
            kind = student.strip("_/")
    if any(a.startswith("metrics=") and "ssim" in a for a in args) and not any(a.startswith("sampler=") for a in args):
        kind = "autoencoder"  # reconstruction metrics without a DDIM sampler: an autoencoder's
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if arg == "trainer=gpu":
            arg = "trainer=cpu"
        elif arg == "trainer=ddp":
            arg = "trainer=ddp_cpu"
        elif arg == "trainer=fsdp" and "plan=true" not in args:  # 2 CPU processes (a plan stays as written)
            arg = "trainer=fsdp_cpu"
        elif key in ("trainer.devices", "trainer.num_nodes") and "trainer=fsdp_cpu" in out:
            continue  # fsdp_cpu's 2 processes
        elif arg == "compile=reduce-overhead":  # CUDA graphs need a GPU
            arg = "compile=none"
        elif key in ("ckpt", "ckpt_path"):
            arg = f"{key}={checkpoints[kind]}"
        elif key == "model.teacher_ckpt" and "experiment=reflow" in args:  # the tiny flow (digits, the tiny UNet),
            diffusion = any(a.startswith("data.teacher_sampler=") and "=flow_" not in a for a in args)
            arg = f"{key}={checkpoints['ddpm' if diffusion else 'flow']}"  # or the tiny DDPM with an ODE solver
            out += ["data.image_size=16", "net=unet_s"]  # the student is the teacher's size and net
        elif key == "model.teacher_ckpt" and "experiment=latent_consistency" in args:  # the tiny text LDM (T = 20)
            arg = f"{key}={checkpoints['text']}"
            out.append("model.skip=2")  # k <= T/2: a 10-point grid
        elif key == "model.teacher_ckpt" and "experiment=guidance_distill" in args:  # the tiny class-conditional model
            arg = f"{key}={checkpoints['cfg']}"
            out.append("model.guidance_steps=1")  # one step of stage one, then the rounds
        elif key == "model.teacher_ckpt":  # a few-step student's teacher: the tiny DDPM (it takes its net and size)
            arg = f"{key}={checkpoints['ddpm']}"
        elif key == "classifier_ckpt":  # a noisy classifier of the tiny models' data, size and schedule
            arg = f"{key}={checkpoints['classifier']}"
        elif key == "upscaler_ckpt":
            arg = f"{key}={checkpoints['upscaler']}"
        elif key == "image" or (key == "mask" and not value.startswith("[") and value != "center"):
            arg = f"{key}={checkpoints[key]}"  # a file the fixture wrote
        elif arg == "data=latents":  # the cache the fixture encoded (digits at 32x32, the shipped stage 1)
            out.append(f"data.cache_dir={checkpoints['latents']}")
        elif key == "data.input_dir":  # the shards the fixture wrote (digits at 16x16)
            arg = f"{key}={checkpoints['shards']}"
        elif script in ("encode.py", "stream.py") and key == "data":  # digits in place of Fashion-MNIST
            out += WRITER_SIZES
            arg = "data=digits"
        elif key == "model.autoencoder_ckpt":
            arg = f"{key}=shipped:ae_kl_f4_fmnist"  # a stage-1 checkpoint of the right shape
        elif key in ("out_dir", "out") and script != "train.py":  # under the test's output folder
            arg = f"{key}=${{paths.output_dir}}/{value}"
        elif script != "train.py" and key in (SAMPLE_SIZES if script == "sample.py" else EVAL_SIZES):
            arg = f"{key}={(SAMPLE_SIZES if script == 'sample.py' else EVAL_SIZES)[key]}"
        out.append(arg)
    sizes = {"sample.py": SAMPLE_SIZES, "eval.py": EVAL_SIZES}.get(script, {})
    chosen = "sampler" in dict_keys(out)  # a sampler group brings its own steps (ddim: 50 > the tiny T = 20)
    out += [f"{k}={v}" for k, v in sizes.items() if k not in dict_keys(out) and (chosen or not k.startswith("sampler"))]
    return out


def dict_keys(args: list[str]) -> set[str]:
    return {a.partition("=")[0] for a in args}


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The jobs of a command line: one for a plain run, the cartesian product of its ``key=a,b`` lists for ``-m``."""
    plain = [a for a in args if a != "-m"]
    if "-m" not in args:
        return [plain]
    jobs: list[list[str]] = [[]]
    for a in plain:
        key, _, value = a.partition("=")
        values = value.split(",") if "=" in a and "[" not in a else [value]
        jobs = [[*job, f"{key}={v}" if "=" in a else a] for job in jobs for v in values]
    return jobs


def training_args(args: list[str], tmp_path: Path) -> list[str]:
    """A training command's arguments plus tiny sizes and digits in place of Fashion-MNIST (at its image size).
    A sweep gets only the sizes that every one of its jobs has (e.g. no UNet widths for a `net=unet_s,dit_tiny` job)."""
    jobs = sweep_jobs(args)
    composed = compose_config(jobs[0], tmp_path)
    extra = []
    # a few-step student takes its (tiny) teacher's net, image size and schedule: none of those are set here
    student = any(a.startswith("model.teacher_ckpt=") for a in args) and "experiment=reflow" not in args
    if "FashionMNIST" in composed.data._target_ or "ImageFolder" in composed.data._target_:
        extra += ["data=digits"] if student else ["data=digits", f"data.image_size={composed.data.image_size}"]
    configs = [compose_config([*job, *extra], tmp_path) for job in jobs]
    absent = object()

    def everywhere(key: str) -> bool:
        return all(OmegaConf.select(c, key, default=absent) is not absent for c in configs)

    teachers = ("net.", "schedule.") if student else ()
    extra += [f"{k}={v}" for k, v in TINY_SIZES.items() if everywhere(k) and not k.startswith(teachers or "\0")]
    if all(OmegaConf.select(c, "model.loss.disc_start") is not None for c in configs):
        extra.append("model.loss.disc_start=1")
    if not student and all(OmegaConf.select(c, "net.attention_resolutions") is not None for c in configs):
        composed = configs[0]
        size = composed.data.image_size // (4 if "autoencoder_ckpt" in composed.model else 1)  # f = 4 latents
        extra.append(f"net.attention_resolutions=[{size // 2}]")
    return [*args, *extra]


def compose_only(p: Plan, tmp_path: Path, checkpoints: dict[str, str]) -> None:
    """Compose a command that cannot run here (SLURM); the launcher's keys only where its plugin is installed."""
    args = [a for a in substitute(p.script, p.args, checkpoints) if not a.startswith("hydra.run.dir=")]
    if not _has_submitit():
        args = [a for a in args if not a.startswith(("hydra/launcher=", "hydra.launcher."))]
    args = [a.split(",")[0] if "=" in a else a for a in args]  # a sweep's first job
    compose_config(args, tmp_path, SCRIPTS[p.script][0], keep_hydra=True)


def _has_submitit() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ the tests

FAST = [p for p in PLANS if p.how == "run" and p.script != "train.py"]
SLOW = [p for p in PLANS if p.how == "subprocess" or (p.how == "run" and p.script == "train.py")]


@pytest.mark.parametrize(
    "p", [p for p in PLANS if p.how in ("run", "subprocess", "compose") and p.script], ids=lambda p: p.command
)
def test_every_command_composes(p, checkpoints, tmp_path):
    """The command line is valid for its config (the failure of issue 21: a key not in struct)."""
    if p.how == "compose":
        compose_only(p, tmp_path, checkpoints)
        return
    args = substitute(
        p.script, [a for a in p.args if a not in ("-m", "--cfg", "job", "--resolve", "--help")], checkpoints
    )
    args = [a.split(",")[0] if "=" in a and "[" not in a else a for a in args]  # a sweep's first job
    compose_config(args, tmp_path, SCRIPTS[p.script][0])


@pytest.mark.parametrize("p", FAST, ids=lambda p: p.command)
def test_sampling_and_evaluation_commands_run(p, checkpoints, tmp_path):
    config, task = SCRIPTS[p.script]
    result = task(compose_config(substitute(p.script, p.args, checkpoints), tmp_path, config))
    if "npz" in result:
        assert np.load(result["npz"])["arr_0"].shape[0] >= 1
    elif p.script == "eval.py":
        assert result["results"] and all(np.isfinite(v) for v in result["results"].values())


@pytest.mark.slow
@pytest.mark.parametrize("p", SLOW, ids=lambda p: p.command)
def test_training_multirun_torchrun_and_make_commands_run(p, checkpoints, tmp_path):
    env = {**os.environ, "DIFFLAB_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    tokens = shlex.split(p.command)
    if tokens[0] == "make":
        target = tokens[1]
        tiny = training_args(["experiment=quickstart"], tmp_path)[1:]
        make_args = [f"ARGS={' '.join(tiny)}"]
        if target == "ldm":
            stage1 = training_args(["experiment=autoencoder_kl_f4"], tmp_path)[1:]
            make_args += [f"STAGE1_ARGS={' '.join(stage1)}", f"STAGE1_DIR={tmp_path / 'stage1'}"]
            make_args = [f"ARGS={' '.join(training_args(['experiment=ldm'], tmp_path)[1:])}", *make_args[1:]]
        command = ["make", "-C", str(ROOT), *tokens[1:], *make_args]
    elif tokens[0] == "torchrun":
        args = substitute("sample.py", tokens[tokens.index("src/sample.py") + 1 :], checkpoints)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "src" / "sample.py"),
            *args,
            "device=cpu",
        ]
    else:
        resume = [a for a in p.args if a.startswith("ckpt_path=")]
        args = substitute(p.script, [a for a in p.args if a not in resume], checkpoints)
        if p.script == "train.py" and not {"--cfg", "--help"} & set(args):  # flags: nothing to shrink
            args = training_args(args, tmp_path)
        if p.how == "run":
            config, task = SCRIPTS[p.script]
            result = task(compose_config(args, tmp_path / "first", config))
            if resume:  # the command resumes a run: that run first, then the command (its config comes from the file)
                before = substitute(p.script, p.args[: p.args.index(resume[0])], checkpoints)
                resumed = [*before, f"ckpt_path={result['checkpoint']}", "trainer.max_steps=4"]
                task(compose_config(resumed, tmp_path, config))
            return
        command = [sys.executable, str(ROOT / "src" / p.script), *args]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\nSTDOUT:\n{proc.stdout[-2000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
