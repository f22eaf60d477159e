"""Plan estimates and rendered job files, through the CLI as a user types it."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from mtf_train.data.mixture import load_mixture
from mtf_train.data.packed import recipe_sample_counts
from mtf_train.recipe.load import load_recipe
from mtf_train.recipe.validate import validate
from mtf_train.rules import BatchSchedule, eval_samples_per_group, parse_time_minutes
from tests.helpers import RECIPES, ROOT, mtf


def plan_json(recipe, *sets):
    args = ["plan", str(RECIPES / recipe), "--json"]
    for s in sets:
        args += ["--set", s]
    return json.loads(mtf(*args, check=True).stdout)


def test_plan_176b_step_time_matches_2022():
    # The 2022 job checkpointed every block (the recipe's auto picks selective now: see test_plan_memory.py).
    p = plan_json("bloomz-176b.yaml", "cluster.tflops_per_gpu=149", "training.recompute=full")
    for key in ("world_size", "data_parallel", "gradient_accumulation", "tokens_per_step", "parameters",
                "step_seconds", "total_gpu_hours", "peak_memory_gb"):
        assert key in p
    assert (p["world_size"], p["data_parallel"], p["gradient_accumulation"]) == (288, 4, 512)
    assert p["tokens_per_step"] == 2048 * 2048
    assert abs(p["parameters"] - 176.25e9) < 0.01e9          # BLOOM-176B
    assert abs(p["step_seconds"] - 140.4) / 140.4 < 0.03      # 2022 topology sweep: TP1/PP72 140.4 s/step
    # 498 steps (the released bloomz) at that speed was ~19.5 h on 288 GPUs: check the per-step arithmetic.
    assert abs(p["step_seconds"] * 498 / 3600 - 19.5) < 0.6
    assert p["total_gpu_hours"] == pytest.approx(p["step_seconds"] * p["train_iters"] / 3600 * 288)
    assert p["layers_per_stage"] == [0] + [1] * 70 + [0]      # 70 blocks + 2 embedding units on 72 stages
    assert p["peak_memory_gb"] < 80
    assert any("ZeRO-1" in n for n in p["notes"])            # why the built-in runtime differs from 2022


def test_plan_memory_grows_with_micro_batch_and_shrinks_with_recomputation():
    base = plan_json("bloomz-7b1.yaml", "training.recompute=full")
    bigger = plan_json("bloomz-7b1.yaml", "batch.micro=8", "training.recompute=full")
    full = base
    no_ckpt = plan_json("bloomz-7b1.yaml", "training.checkpoint_activations=false")  # finetune_t0's switch
    assert (full["recompute"], no_ckpt["recompute"]) == ("full", "none")
    assert bigger["peak_memory_gb"] > base["peak_memory_gb"]
    assert no_ckpt["peak_memory_gb"] > full["peak_memory_gb"]
    # Recomputation repeats the blocks' forward (72 -> 96), not the LM head (6*h*V per token either way).
    l, h, s, v = 30, 4096, 2048, 250880
    blocks = 72 * l * h * h * (1 + s / (6 * h))
    assert no_ckpt["step_seconds"] == pytest.approx(full["step_seconds"] * (blocks + 6 * h * v)
                                                    / (blocks * 96 / 72 + 6 * h * v))
    sharded = plan_json("bloomz-7b1.yaml", "precision.zero_stage=0", "training.recompute=full")
    assert sharded["peak_memory_gb"] > base["peak_memory_gb"]  # ZeRO-1 shards optimizer states over dp


def test_plan_text_prints_the_formula_and_accumulation():
    out = mtf("plan", str(RECIPES / "bloomz-1b1.yaml"), check=True).stdout
    assert "world 128 = pp 2 x tp 1 x dp 64" in out
    assert "accumulation 16" in out
    assert "72*B*s*l*h^2*(1 + s/(6h)) + 6*B*s*h*V" in out
    assert "recompute    none (auto: least recomputation that fits 72.0 GB" in out


@pytest.mark.parametrize("text, minutes", [("100:00:00", 6000), ("30", 30), ("10:30", 11), ("1-00:00:00", 1440),
                                           ("2-3", 2 * 1440 + 180), ("abc", None), ("1:2:3:4", None)])
def test_slurm_time_formats(text, minutes):
    assert parse_time_minutes(text) == minutes


def test_plan_and_render_import_no_torch(tmp_path):
    code = f"""
import sys
from mtf_train.cli import main
assert main(["plan", {str(RECIPES / 'bloomz-176b.yaml')!r}]) == 0
assert main(["render", {str(RECIPES / 'bloomz-176b.yaml')!r}, "-o", {str(tmp_path / 'r')!r}]) == 0
try:
    main(["--help"])
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ("torch", "deepspeed", "megatron", "transformers"))
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


# The 2022 bloomz-176b job (bigscience tr13f): every argument and value of the 2022 job (paths come from the recipe).
ARGS_2022 = """--universal-checkpoint --tensor-model-parallel-size 1 --pipeline-model-parallel-size 72
--pp-partition-method type:transformer|embedding --num-layers 70 --hidden-size 14336 --num-attention-heads 112
--seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 1 --global-batch-size 2048
--train-samples 6348800 --tokenizer-type PretrainedFromHF --tokenizer-name-or-path bigscience/tokenizer
--init-method-std 0.0048 --embed-layernorm --sync-tp-duplicated-parameters --bf16 --seed 42
--position-embedding-type alibi --checkpoint-activations --abort-on-unmet-fused-kernel-constraints
--pad-vocab-size-to 250880 --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --lr 2e-5
--lr-decay-style constant --lr-warmup-samples 0 --clip-grad 1.0 --weight-decay 1e-4 --no-load-optim
--norm-target-loss --reset-progress --exit-duration-in-mins 5990 --log-interval 1 --eval-interval 250
--eval-iters 10 --tensorboard-queue-size 5 --log-timers-to-tensorboard --log-batch-size-to-tensorboard
--log-validation-ppl-to-tensorboard --dataloader-type single --data-impl mmap --distributed-backend nccl
--deepspeed --zero-stage 0 --deepspeed-activation-checkpointing"""
DS_2022 = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2048, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 0}, "bf16": {"enabled": True}, "steps_per_print": 2000,
           "wall_clock_breakdown": False}


def program_args(job_script: str, first_run: bool = True) -> list[str]:
    """The trainer's argv as the job script builds it (first job of a run)."""
    first = re.findall(r"^  FIRST_RUN=\((.*)\)$", job_script, re.M)[-1] if first_run else ""
    body = re.search(r"^PROGRAM=\((.*?)\)$", job_script, re.M | re.S).group(1)
    body = body.replace('"${FIRST_RUN[@]}"', first).replace('"$KILL_SWITCH_PATH"', "KILL").replace('"$LOAD"', "LOAD")
    return shlex.split(body)


def as_pairs(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    key = None
    for a in args:
        if a.startswith("--"):
            key = a
            out.setdefault(key, [])
        elif key is not None:
            out[key].append(a)
    return out


def test_render_176b_external_runtime_carries_every_2022_argument(tmp_path):
    out = tmp_path / "job"
    mtf("render", str(RECIPES / "bloomz-176b.yaml"), "-o", str(out), "--set", "runtime.kind=megatron_deepspeed",
        "--set", "runtime.megatron_deepspeed_dir=/opt/Megatron-DeepSpeed", "--set", "data.root=/data/xp3",
        "--set", "cluster.cuda_launch_blocking=true", check=True)  # the 2022 stack's hang workaround, asked for
    script = (out / "job.sbatch").read_text()
    args = program_args(script)
    assert args[0] == "/opt/Megatron-DeepSpeed/finetune_t0.py"
    got = as_pairs(args[1:])
    want = as_pairs(shlex.split(ARGS_2022))
    for flag, values in want.items():
        assert flag in got, f"missing {flag}"
        if values:
            got_v = got[flag][-1:] if flag == "--save-interval" else got[flag]
            assert [float(v) if re.fullmatch(r"[\d.e+-]+", v) else v for v in got_v] == \
                   [float(v) if re.fullmatch(r"[\d.e+-]+", v) else v for v in values], flag
    assert got["--save"] == [str(out / "checkpoints")] and got["--load"] == ["LOAD"]
    assert got["--kill-switch-path"] == ["KILL"]
    assert got["--train-weighted-split-paths-path"] == [str(out / "data_paths/xp3capmixnewcodelong_train.txt")]
    assert got["--deepspeed_config"] == [str(out / "ds_config.json")]
    assert json.loads((out / "ds_config.json").read_text()) == DS_2022
    # SBATCH header and launcher of section 2.
    for line in ("#SBATCH --nodes=36", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=64",
                 "#SBATCH --hint=nomultithread", "#SBATCH --gres=gpu:8", "#SBATCH --time=100:00:00",
                 "#SBATCH --constraint=a100", "export CUDA_LAUNCH_BLOCKING=1", "export NCCL_ASYNC_ERROR_HANDLING=1",
                 "export HF_DATASETS_OFFLINE=1", "export TRANSFORMERS_OFFLINE=1", "MASTER_PORT=6001",
                 "srun --wait=60 --kill-on-bad-exit=1", "--rdzv_backend c10d", "--max_restarts 0 --tee 3",
                 "--nproc_per_node 8", 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1',
                 "TORCHELASTIC_ERROR_FILE",
                 # alone (no SLURM), the external trainer runs under torchrun too
                 "-u -m torch.distributed.run --nproc_per_node 8 --standalone --nnodes 1 --max_restarts 0 --tee 3)"):
        assert line in script, line
    # Path files are rebased onto data.root.
    text = (out / "data_paths/xp3capmixnewcodelong_validation.txt").read_text()
    assert text.startswith('"validation: 0.3924620202 0.950:1 /data/xp3/xp3_en, ')
    assert subprocess.run(["bash", "-n", str(out / "job.sbatch")]).returncode == 0


def test_render_176b_builtin_runtime_follows_current_deepspeed(tmp_path):
    out = tmp_path / "job"
    mtf("render", str(RECIPES / "bloomz-176b.yaml"), "-o", str(out), check=True)
    # Launches stay asynchronous unless a recipe asks for the 2022 hang workaround.
    assert "CUDA_LAUNCH_BLOCKING" not in (out / "job.sbatch").read_text()
    # Without SLURM the built-in trainer's ranks start through mtf_train.ranks (torchrun on SLURM nodes).
    assert "-u -m mtf_train.ranks --nproc_per_node 8)" in (out / "job.sbatch").read_text()
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"] == {"stage": 1} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    args = as_pairs(program_args((out / "job.sbatch").read_text()))
    assert args["--zero-stage"] == ["1"] and "--bf16" in args
    assert "ZeRO-1" in (out / "plan.txt").read_text()
    for name in ("job.sbatch", "ds_config.json", "recipe.resolved.yaml", "plan.json",
                 "data_paths/xp3capmixnewcodelong_train.txt", "data_paths/xp3capmixnewcodelong_validation.txt"):
        assert (out / name).is_file(), name
    # The resolved recipe loads again and means the same thing.
    again = load_recipe(out / "recipe.resolved.yaml")
    assert validate(again).dp == 4


@pytest.mark.parametrize("recipe", ["bloomz-560m", "bloomz-1b7", "bloomz-176b", "tiny-local"])
@pytest.mark.parametrize("first_run", [True, False])
def test_rendered_arguments_parse_in_the_builtin_trainer(tmp_path, recipe, first_run):
    from mtf_train.train.args import parse_args

    out = tmp_path / "job"
    mtf("render", str(RECIPES / f"{recipe}.yaml"), "-o", str(out), check=True)
    argv = program_args((out / "job.sbatch").read_text(), first_run=first_run)
    assert argv[:2] == ["-m", "mtf_train.train"]
    args = parse_args(argv[2:])
    r = load_recipe(RECIPES / f"{recipe}.yaml")
    assert args.num_layers == r.model.num_layers and args.global_batch_size == r.batch.global_
    assert args.lr == r.optimizer.lr and args.adam_eps == r.optimizer.eps
    if first_run and r.checkpoint.first_interval:
        assert args.save_interval == r.checkpoint.first_interval  # the first job saves early
    else:
        assert args.save_interval == r.checkpoint.interval
    # The data caches are sized from the recipe (`mtf-train data index`), the trainer sizes its datasets from these
    # arguments: the counts must be equal or the trainer misses every cache.
    counts = recipe_sample_counts(r)
    batches = BatchSchedule(args.global_batch_size, tuple(args.rampup_batch_size) if args.rampup_batch_size else None)
    iters, samples = batches.length(args.train_iters, args.train_samples)
    assert (iters, samples) == (counts.train_iters, counts.train_samples)
    assert eval_samples_per_group(iters, args.eval_interval, args.eval_iters, args.global_batch_size) \
        == counts.eval_samples_per_group


def test_trainer_refuses_unknown_and_contradictory_arguments():
    from mtf_train.errors import UserError
    from mtf_train.train.args import parse_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3", "--tokenizer-name-or-path", "t",
            "--train-weighted-split-paths-path", "p.txt"]
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):
        parse_args(base + ["--train-iters", "2", "--bogus"])
    with pytest.raises(UserError, match="exactly one of --train-samples and --train-iters"):
        parse_args(base + ["--train-iters", "2", "--train-samples", "4"])
    with pytest.raises(UserError, match="--fp16 and --bf16 are exclusive"):
        parse_args(base + ["--train-iters", "2", "--fp16", "--bf16"])
    with pytest.raises(UserError, match="--tensor-model-parallel-size 3"):
        parse_args(base + ["--train-iters", "2", "--tensor-model-parallel-size", "3"])
    assert parse_args(base + ["--train-iters", "2"]).max_position_embeddings == 32


def test_small_model_fp16_deepspeed_block(tmp_path):
    out = tmp_path / "job"
    mtf("render", str(RECIPES / "bloomz-560m.yaml"), "-o", str(out), check=True)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
                          "min_loss_scale": 1, "initial_scale_power": 12}
    assert ds["train_batch_size"] == 1024 and ds["zero_optimization"] == {"stage": 1}


EVIL = "a'b\"c$(touch x)`touch y`;touch z"


def test_recipe_strings_reaching_the_shell_stay_literal(tmp_path):
    out = tmp_path / "job"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"base: {RECIPES / 'bloomz-560m.yaml'}\n"
                      f"runtime: {{python: {json.dumps('/opt/py thon/' + EVIL)}}}\n"
                      f"data: {{tokenizer: {json.dumps(EVIL)}}}\n"
                      f"environment:\n  env:\n    EVIL: {json.dumps(EVIL)}\n  container:\n"
                      f"    image: {json.dumps(EVIL)}\n")
    mtf("render", str(recipe), "-o", str(out), check=True)
    script = (out / "job.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(out / "job.sbatch")]).returncode == 0
    # Run the rendered environment block and the argument arrays, then print what bash made of them.
    env_block = "\n".join(ln for ln in script.splitlines() if ln.startswith("export "))
    launchers = re.findall(r"^\s*(LAUNCHER=\(.*?\))$", script, re.M | re.S)
    assert len(launchers) == 2  # torchrun on SLURM nodes, mtf_train.ranks alone
    program = re.search(r"^PROGRAM=\(.*?\)$", script, re.M | re.S).group(0)
    probe = (f"FIRST_RUN=(); JOB=1; RUN_DIR=.\n{env_block}\n{program}\n" + "".join(
             f'{launcher}\nprintf "%s\\n" "${{LAUNCHER[0]}}"\n' for launcher in launchers) +
             'printf "%s\\n" "$EVIL"; for a in "${PROGRAM[@]}"; do printf "%s\\n" "$a"; done\n')
    work = tmp_path / "sandbox"
    work.mkdir()
    res = subprocess.run(["bash", "-c", probe], cwd=work, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:2] == ["/opt/py thon/" + EVIL] * 2
    assert lines[2] == EVIL
    assert EVIL in lines  # the tokenizer argument
    assert list(work.iterdir()) == []  # nothing was executed
    assert f"--container-image={EVIL}" in shlex.split(re.search(r"^  srun (.*)\\$", script, re.M).group(1))


def test_data_paths_are_generated_from_the_mixture(tmp_path):
    mixture = load_mixture(ROOT / "data_paths/xp3capmixnewcodelong.yaml")
    files = mixture.path_files()
    for name, text in files.items():
        assert (ROOT / "data_paths" / name).read_text() == text
    train = files["xp3capmixnewcodelong_train.txt"]
    entries = train.strip().strip('"').removeprefix("train: ").split(", ")
    assert len(entries) == 46
    assert entries[0] == "0.3924620202 0:0.950 xp3_en"
    assert "0.048344327 0:0.950 xp3_zh" in entries
    assert [e.split()[2] for e in entries[2:5]] == ["xp3_pt", "xp3_code", "xp3_fr"]
    assert abs(sum(float(e.split()[0]) for e in entries) - 1.0136844229) < 1e-9


def test_dry_run_makes_a_new_run_folder_each_time(tmp_path):
    args = ["bloomz-7b1", "--dry-run", "--runs-dir", str(tmp_path)]
    first = mtf(str(RECIPES / "bloomz-7b1.yaml"), *args[1:], check=True)
    second = mtf(str(RECIPES / "bloomz-7b1.yaml"), *args[1:], check=True)
    runs = sorted((tmp_path / "bloomz-7b1").iterdir())
    assert len(runs) == 2 and all(not r.name.startswith(".") for r in runs)
    for run in runs:
        info = json.loads((run / "run.json").read_text())
        assert info["state"] == "rendered" and info["versions"]["python"]
        assert "--dry-run" in info["command"]
        assert (run / "job.sbatch").is_file() and "dry run" in (run / "events.log").read_text()
    assert str(runs[0]) in first.stdout + second.stdout


def test_help_lists_commands():
    out = mtf("--help", check=True).stdout
    for cmd in ("plan", "render", "validate", "data"):
        assert cmd in out


def test_recipe_reference_is_up_to_date():
    generated = mtf("schema", check=True).stdout
    assert (ROOT / "docs/recipe.md").read_text() == generated, "run: mtf-train schema > docs/recipe.md"
