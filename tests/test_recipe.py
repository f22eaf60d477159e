"""Recipes: loading, inheritance, overrides, typed schema and every validation rule."""
from __future__ import annotations

import textwrap

import pytest

from mtf_train.errors import RecipeError, UserError
from mtf_train.recipe.load import dump_recipe, load_recipe
from mtf_train.recipe.validate import validate
from tests.helpers import RECIPES, mtf, one_line_error

# The 2022 bloomz jobs (bigscience tr13): layers, hidden, heads, pp, tp, nodes, dp, micro, global, dtype, zero.
SHIPPED = {
    "bloomz-560m": (24, 1024, 16, 1, 1, 4, 32, 1, 1024, "fp16", 1),
    "bloomz-1b1": (24, 1536, 16, 2, 1, 16, 64, 1, 1024, "fp16", 1),
    "bloomz-1b7": (24, 2048, 16, 2, 2, 8, 16, 1, 2048, "fp16", 1),
    "bloomz-3b": (30, 2560, 32, 2, 1, 16, 64, 1, 2048, "fp16", 1),
    "bloomz-7b1": (30, 4096, 32, 1, 1, 8, 64, 4, 2048, "fp16", 1),
    "bloomz-176b": (70, 14336, 112, 72, 1, 36, 4, 1, 2048, "bf16", 0),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipes_have_the_2022_shapes(name):
    r = load_recipe(RECIPES / f"{name}.yaml")
    s = validate(r)
    layers, hidden, heads, pp, tp, nodes, dp, micro, gbs, dtype, zero = SHIPPED[name]
    assert (r.model.num_layers, r.model.hidden_size, r.model.num_attention_heads) == (layers, hidden, heads)
    assert (s.pp, s.tp, r.cluster.nodes, s.dp, s.micro, s.global_batch) == (pp, tp, nodes, dp, micro, gbs)
    assert (r.precision.dtype, r.precision.zero_stage) == (dtype, zero)
    assert r.cluster.gpus_per_node == 8
    # Common to all (section 1).
    assert r.model.seq_length == 2048 and s.max_positions == 2048 and s.padded_vocab == 250880
    assert r.training.train_samples == 6_348_800 and r.training.seed == 42
    o = r.optimizer
    assert (o.beta1, o.beta2, o.eps, o.lr, o.schedule, o.warmup_samples, o.clip_grad, o.weight_decay) == \
        (0.9, 0.95, 1e-8, 2e-5, "constant", 0, 1.0, 1e-4)
    # 2022 checkpointed every block; the recipes now let the plan pick the least recomputation that fits.
    assert r.training.norm_target_loss and r.training.recompute == "auto" and r.training.fused_kernels
    assert r.model.init_method_std == 0.0048 and r.model.embed_layernorm
    assert r.model.position_embedding_type == "alibi"
    assert r.eval.interval == (250 if name == "bloomz-176b" else 125)
    if dtype == "fp16":
        p = r.precision
        assert (p.loss_scale, p.loss_scale_window, p.hysteresis, p.min_loss_scale, p.initial_scale_power) == \
            (0, 500, 2, 1, 12)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_base_inheritance_deep_merges_and_set_overrides(tmp_path):
    write(tmp_path, "base.yaml", """
        model: {num_layers: 4, hidden_size: 128, num_attention_heads: 8}
        cluster: {time: 100:00:00, env_unused: null}
    """.replace("env_unused: null", "nodes: 2"))
    child = write(tmp_path, "child.yaml", """
        base: base.yaml
        model: {hidden_size: 256}
        optimizer: {eps: 1e-8}
    """)
    r = load_recipe(child, ["model.num_attention_heads=16", "optimizer.lr=3e-4", "cluster.exclude=[n1, n2]"])
    assert (r.model.num_layers, r.model.hidden_size, r.model.num_attention_heads) == (4, 256, 16)
    assert r.cluster.nodes == 2
    assert r.cluster.time == "100:00:00"          # not YAML 1.1's base-60 integer 360000
    assert r.optimizer.eps == 1e-8 and isinstance(r.optimizer.eps, float)
    assert r.optimizer.lr == 3e-4
    assert r.cluster.exclude == ["n1", "n2"]
    assert r.name == "child"
    # The provenance of each field is known: the error names the right file.
    assert r.origin.of("model.num_layers").endswith("base.yaml")
    assert r.origin.of("model.hidden_size").endswith("child.yaml")
    assert r.origin.of("model.num_attention_heads") == "--set model.num_attention_heads=16"


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(RECIPES / "bloomz-1b7.yaml", ["data.root=/data/xp3"])
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_recipe(r))
    again = load_recipe(out)
    again.name = r.name
    assert dump_recipe(again) == dump_recipe(r)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("text, sets, field, reason", [
    ("model: {hiden_size: 64}\n", [], "model.hiden_size", "did you mean model.hidden_size"),
    ("paralel: {tp: 2}\n", [], "paralel", "did you mean parallel"),
    ("model: {num_layers: two}\n", [], "model.num_layers", "must be an integer"),
    ("model: {num_layers: 0}\n", [], "model.num_layers", "must be >= 1"),
    ("precision: {dtype: fp8}\n", [], "precision.dtype", "must be one of fp32, bf16, fp16"),
    ("training: {norm_target_loss: 1}\n", [], "training.norm_target_loss", "must be true or false"),
    ("model: [1, 2]\n", [], "model", "must be a mapping"),
    ("", ["parallel.tp=x"], "parallel.tp", "must be an integer"),
    ("", ["parallel.tpp=2"], "parallel.tpp", "did you mean parallel.tp"),
])
def test_schema_errors_name_file_field_and_reason(tmp_path, text, sets, field, reason):
    p = write(tmp_path, "r.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(p, sets)
    line = str(info.value)
    assert field in line and reason in line
    assert line.startswith("--set" if sets else str(p))
    assert "\n" not in line


def tiny(tmp_path, *sets):
    return load_recipe(RECIPES / "tiny-local.yaml", list(sets))


# Each rule of the foundation issue, with the field it must name.
RULES = [
    (["cluster.nodes=1", "cluster.gpus_per_node=3", "parallel.tp=2"], "parallel.tp", "not divisible by pp 1 x tp 2"),
    (["parallel.tp=2", "cluster.gpus_per_node=3"], "cluster.gpus_per_node", "not divisible by pp 1 x tp 2"),
    (["parallel.dp=4"], "parallel.dp", "nodes x gpus_per_node = 2"),
    (["batch.global=17"], "batch.global", "not divisible by micro 4 x dp 2"),
    (["model.num_layers=3", "parallel.pp=2", "parallel.dp=1"], "parallel.pp", "layers + 2 embedding units = 5"),
    (["parallel.tp=2", "parallel.dp=1", "model.num_attention_heads=3", "model.hidden_size=66"],
     "model.num_attention_heads", "not divisible by tp 2"),
    (["model.hidden_size=66"], "model.hidden_size", "not divisible by num_attention_heads 4"),
    (["model.pad_vocab_size_to=2561", "parallel.tp=2", "parallel.dp=1"], "model.pad_vocab_size_to",
     "not divisible by tp 2"),
    (["model.pad_vocab_size_to=1000"], "model.pad_vocab_size_to", "smaller than the vocabulary (2531)"),
    (["model.max_position_embeddings=128"], "model.seq_length", "exceeds max_position_embeddings 128"),
    (["training.fused_kernels=true", "model.seq_length=16"], "model.seq_length", "fused softmax limits"),
    (["training.fused_kernels=true", "model.seq_length=8192", "model.max_position_embeddings=8192"],
     "model.seq_length", "fused softmax limits"),
    (["training.fused_kernels=true", "model.seq_length=130"], "model.seq_length", "seq % 4 == 0"),
    (["training.fused_kernels=true", "batch.micro=1", "batch.global=16", "model.num_attention_heads=2"],
     "batch.micro", "multiple of 4"),
    (["precision.dtype=fp16"], "precision.dtype", "fp16 needs GPUs"),
    (["runtime.kind=megatron_deepspeed", "runtime.megatron_deepspeed_dir=/x", "cluster.accelerator=gpu",
      "precision.dtype=bf16", "precision.zero_stage=1"], "precision.zero_stage", "needs zero_stage 0"),
    (["training.exit_duration_in_mins=25"], "training.exit_duration_in_mins", "save_margin_mins 10"),
    (["cluster.time=1:xx"], "cluster.time", "is not a SLURM time"),
    (["training.train_samples=1000", "training.train_iters=null"], "training.train_samples",
     "not a whole number of steps"),
    (["training.train_samples=1600"], "training.train_samples", "exactly one of"),
    (["model.position_embedding_type=absolute"], "model.position_embedding_type", "need alibi"),
    (["data.train_path=missing.txt"], "data.train_path", "file not found"),
    (["cluster.partition=a b"], "cluster.partition", "sbatch would misread"),
    (["environment.env={'A-B': 1}"], "environment.env.A-B", "not a valid environment variable name"),
    (['cluster.extra_sbatch=["--mem=1G\\n#x"]'], "cluster.extra_sbatch", "one sbatch option"),
    (["cluster.extra_sbatch=[mem=1G]"], "cluster.extra_sbatch", "one sbatch option"),
]


@pytest.mark.parametrize("sets, field, reason", RULES, ids=[r[1] + ":" + r[2][:20] for r in RULES])
def test_validation_rules(tmp_path, sets, field, reason):
    r = tiny(tmp_path, *sets)
    with pytest.raises(RecipeError) as info:
        validate(r)
    line = str(info.value)
    assert f": {field}: " in line, line
    assert reason in line, line


def test_path_file_grammar_errors_say_where(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text('"train: 0.5 0:0.95 /a/b, 0.5 0.9 /a/c"\n')
    r = tiny(tmp_path, f"data.train_path={bad}")
    with pytest.raises(UserError) as info:
        validate(r)
    assert str(info.value) == (f"{bad}: group 'train', entry 2, column 26: split '0.9' must be S:E with "
                               "0 <= S < E <= 1")


def test_check_data_finds_missing_dataset_files(tmp_path):
    paths = tmp_path / "p.txt"
    paths.write_text('"train: 1 0:1 nowhere/xp3_en"\n')
    r = tiny(tmp_path, f"data.train_path={paths}", "data.valid_path=null", f"data.root={tmp_path}")
    validate(r)  # the grammar is fine
    with pytest.raises(RecipeError, match=r"dataset file missing: .*nowhere/xp3_en_inputs_document.bin"):
        validate(r, check_data=True)


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path):
    p = write(tmp_path, "r.yaml", "base: ../recipes/tiny-local.yaml\nparallel: {tp: 3}\n")
    p.write_text(f"base: {RECIPES / 'tiny-local.yaml'}\nparallel: {{tp: 3}}\n")
    for cmd in ("plan", "render", "validate"):
        extra = ["-o", str(tmp_path / "out")] if cmd == "render" else []
        line = one_line_error(mtf(cmd, str(p), *extra))
        # The conflict is blamed on the field this file changed, not on the base's cluster.nodes.
        assert line == f"mtf-train: error: {p}: parallel.tp: world size 2 (nodes 1 x gpus_per_node 2) is not " \
                       "divisible by pp 1 x tp 3"
    assert not (tmp_path / "out").exists()
    line = one_line_error(mtf("plan", str(tmp_path / "nope.yaml")))
    assert "nope.yaml: cannot read recipe" in line
    write(tmp_path, "broken.yaml", "model: {num_layers: 2\n")
    assert "invalid YAML" in one_line_error(mtf("plan", str(tmp_path / "broken.yaml")))
    assert "expected KEY.PATH=VALUE" in one_line_error(mtf("plan", str(p), "--set", "novalue"))


# ------------------------------------------------------------------ issue 12: what a recipe must say, and who is blamed

def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path):
    p = write(tmp_path, "dup.yaml", f"""\
        base: {RECIPES / 'tiny-local.yaml'}
        model:
          num_layers: 2
          num_layers: 4
        """)
    line = one_line_error(mtf("validate", str(p)))
    assert line == f"mtf-train: error: {p}: line 4, column 3: invalid YAML: duplicate key 'num_layers' (first at line 3)"
    p = write(tmp_path, "dup2.yaml", f"base: {RECIPES / 'tiny-local.yaml'}\nmodel: {{}}\nmodel: {{num_layers: 3}}\n")
    assert "duplicate key 'model' (first at line 2)" in one_line_error(mtf("plan", str(p)))


@pytest.mark.parametrize("sets, reason", [
    (["base=bloomz-base.yaml"], "base cannot be overridden"),
    (["modle.num_layers=3"], "modle: unknown field; did you mean model?"),
    (["data.tokenizer=/nonexistent"], "data.tokenizer: folder not found: /nonexistent"),
    (["cluster.time=00:05:00"], "cluster.time: signal_margin_s 300 s is not shorter than the time limit 00:05:00"),
    (["cluster.time=00:12:00", "training.exit_duration_in_mins=5"], "save_margin_mins 10"),
])
def test_set_errors_blame_the_set(tmp_path, sets, reason):
    """Typed as a user types them, from another folder with a relative recipe path."""
    args = ["validate", "../recipes/tiny-local.yaml"]
    for s in sets:
        args += ["--set", s]
    line = one_line_error(mtf(*args, cwd=RECIPES.parent / "docs"))
    assert line.startswith(f"mtf-train: error: --set {sets[-1]}: "), line
    assert reason in line, line


@pytest.mark.parametrize("sets, field, reason", [
    (["model.embed_layernorm=false"], "model.embed_layernorm", "not supported by the built-in trainer"),
    (["parallel.sync_tp_duplicated_parameters=false"], "parallel.sync_tp_duplicated_parameters",
     "not supported by the built-in trainer"),
    (["data.dataloader_type=cyclic"], "data.dataloader_type", "not supported by the built-in trainer"),
])
def test_settings_the_built_in_trainer_lacks_are_refused(tmp_path, sets, field, reason):
    line = one_line_error(mtf("validate", str(RECIPES / "tiny-local.yaml"), *[a for s in sets for a in ("--set", s)]))
    assert f"--set {sets[0]}: {field}: " in line and reason in line, line
    # The Megatron-DeepSpeed runtime has them: the same settings pass there.
    r = load_recipe(RECIPES / "bloomz-7b1.yaml", sets + ["runtime.kind=megatron_deepspeed",
                                                       "runtime.megatron_deepspeed_dir=/opt/mds"])
    validate(r)


def test_a_finetune_names_what_it_starts_from(tmp_path):
    # Every shipped BLOOMZ recipe names its pretrained checkpoint.
    for name in ("bloomz-560m", "bloomz-1b1", "bloomz-1b7", "bloomz-3b", "bloomz-7b1", "bloomz-176b"):
        r = load_recipe(RECIPES / f"{name}.yaml")
        assert r.checkpoint.load and r.checkpoint.no_load_optim and r.checkpoint.reset_progress, name
    bloomz = str(RECIPES / "bloomz-560m.yaml")
    line = one_line_error(mtf("validate", bloomz, "--set", "checkpoint.load=null"))
    assert line.startswith("mtf-train: error: --set checkpoint.load=null: checkpoint.load: a finetune "
                           "(no_load_optim, reset_progress) must name the checkpoint it starts from"), line
    assert "checkpoint.from_scratch: true" in line
    out = mtf("validate", bloomz, "--set", "checkpoint.load=null", "--set", "checkpoint.from_scratch=true",
              check=True).stdout
    assert "valid" in out
    line = one_line_error(mtf("validate", bloomz, "--set", "checkpoint.from_scratch=true"))
    assert "checkpoint.from_scratch: contradicts checkpoint.load" in line
    # First-run flags on the tiny recipe need the same.
    line = one_line_error(mtf("validate", str(RECIPES / "tiny-local.yaml"), "--set", "checkpoint.reset_progress=true"))
    assert "a finetune (reset_progress) must name the checkpoint" in line


def test_version():
    from mtf_train import __version__

    proc = mtf("--version", check=True)
    assert proc.stdout.strip() == f"mtf-train {__version__}"
