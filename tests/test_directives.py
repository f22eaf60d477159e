"""Scheduler directives, trainer runtimes and executors: each decided in one place and used everywhere."""
from __future__ import annotations

import pytest

from mtf_train.errors import RecipeError
from mtf_train.launch import executors
from mtf_train.recipe.directives import directives
from mtf_train.recipe.load import load_recipe
from mtf_train.recipe.runtime import runtime
from tests.helpers import RECIPES, mtf, one_line_error

SETS = ["cluster.partition=gpu", "cluster.account=proj", "cluster.exclude=[n3,n7]", "cluster.hint=nomultithread",
        "cluster.exclusive=true", "cluster.extra_sbatch=['--mail-type=END', '--comment hello world']"]


def sbatch_lines(path) -> list[str]:
    return [ln.removeprefix("#SBATCH ") for ln in path.read_text().splitlines() if ln.startswith("#SBATCH ")]


def test_every_rendered_script_asks_for_the_recipes_cluster_options(tmp_path):
    """The training and evaluation jobs differ in name, nodes, GPUs and time only; both carry every cluster
    option (exclude included) from the same function."""
    args = ["render", str(RECIPES / "bloomz-176b.yaml"), "-o", str(tmp_path), "--set", "eval.zero_shot.job=after_training"]
    for s in SETS:
        args += ["--set", s]
    mtf(*args, check=True)
    job, ev = sbatch_lines(tmp_path / "job.sbatch"), sbatch_lines(tmp_path / "eval.sbatch")
    shared = ["--partition=gpu", "--account=proj", "--exclusive", "--exclude=n3,n7", "--hint=nomultithread",
              "--cpus-per-task=64", "--ntasks-per-node=1", "--mail-type=END", "--comment hello world"]
    for line in shared:
        assert line in job and line in ev, line
    assert job[-2:] == ev[-2:] == ["--mail-type=END", "--comment hello world"]  # extra lines last, as given
    assert "--job-name=bloomz-176b" in job and "--job-name=bloomz-176b-eval" in ev
    assert "--nodes=36" in job and "--nodes=1" in ev
    assert "--gres=gpu:8" in job and "--time=100:00:00" in job and "--time=02:00:00" in ev
    assert f"--output={tmp_path}/logs/%x-%j.out" in job and "--signal=B:USR1@300" in job
    assert not any(x.startswith("--signal") for x in ev)


def test_submitit_gets_the_same_directives_as_the_script():
    r = load_recipe(RECIPES / "bloomz-176b.yaml", SETS)
    p = directives(r).submitit_parameters()
    assert p["job_name"] == "bloomz-176b" and p["nodes"] == 36 and p["ntasks_per_node"] == 1
    assert p["gres"] == "gpu:8" and p["time"] == 6000 and p["exclude"] == "n3,n7" and p["exclusive"] is True
    assert p["partition"] == "gpu" and p["account"] == "proj" and p["cpus_per_task"] == 64
    assert p["additional_parameters"] == {"hint": "nomultithread", "mail_type": "END", "comment": "hello world"}
    assert "output" not in p and "signal" not in p  # submitit writes its own


@pytest.mark.parametrize("sets,field", [(["cluster.exclude=['n1 n2']"], "cluster.exclude"),
                                        (["cluster.partition=a b"], "cluster.partition"),
                                        (["cluster.extra_sbatch=[mail]"], "cluster.extra_sbatch"),
                                        (["cluster.time=soon"], "cluster.time")])
def test_directives_refuse_what_sbatch_would_misread(sets, field):
    """Every caller (the reshape job too, which does not validate the whole recipe) gets these checks."""
    with pytest.raises(RecipeError) as err:
        directives(load_recipe(RECIPES / "tiny-local.yaml", sets))
    assert err.value.field == field
    if field != "cluster.time":  # validate names a bad time earlier, with the plan's derived limits
        assert f"{field}: " in one_line_error(mtf("validate", str(RECIPES / "tiny-local.yaml"), "--set", sets[0]))


def test_runtime_answers_for_its_trainer():
    builtin = runtime(load_recipe(RECIPES / "tiny-local.yaml"))
    assert builtin.program() == ["-m", "mtf_train.train"] and builtin.bf16_as_zero1 and not builtin.auto_recompute
    ext = runtime(load_recipe(RECIPES / "bloomz-176b.yaml", ["runtime.kind=megatron_deepspeed", "precision.zero_stage=1",
                                                             "runtime.megatron_deepspeed_dir=/opt/MDS"]))
    assert ext.program() == ["/opt/MDS/finetune_t0.py"] and ext.auto_recompute == "full"
    assert not ext.has_flex_attention and ext.own_args("full") == [] and ext.loader_args() == []
    assert [f for f, _ in ext.refusals()] == ["precision.zero_stage"]  # bf16 with ZeRO-1 is the built-in's


def test_executor_is_chosen_once_from_the_recipe_or_the_run():
    r = load_recipe(RECIPES / "tiny-local.yaml")
    assert executors.choose(r, None).name == "local" and executors.choose(r, "slurm").name == "slurm"
    assert executors.of_run({"executor": "slurm", "job_ids": ["1"]}).name == "slurm"
    here = executors.of_run({"executor": "submitit", "submitit": {"local_pid": "1"}})
    assert here.runs_here and isinstance(here._jobs, executors.LocalExecutor)
    queued = executors.of_run({"executor": "submitit", "job_ids": ["7"]})
    assert not queued.runs_here and isinstance(queued._jobs, executors.SlurmExecutor)
    assert executors.of_run({}).name == "local"
