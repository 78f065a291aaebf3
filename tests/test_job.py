"""The one conversion job behind `qconvert flux`, `qconvert release` and the Python API."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli
from test_release import GOOD
from qconvert import job as jobs
from qconvert.errors import AuthError, InputError, OutputExists, UsageError, ValidationFailed


def test_default_out_and_repo_name():
    assert jobs.default_out("tiny-flux", "bnb", "nf4").as_posix() == "out/tiny-flux-bnb-nf4"
    assert jobs.default_out("black-forest-labs/FLUX.1-dev", "gguf", "Q8_0").name == "FLUX.1-dev-gguf-Q8_0"
    assert jobs.default_out("dir/flux1-dev.safetensors", "torchao", "int8wo").name == "flux1-dev-torchao-int8wo"


def test_api_runs_convert_validate_card(tmp_path):
    events: list[str] = []
    job = jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "o", card=True)
    result = jobs.run(job, on_event=lambda kind, value: events.append(kind))
    assert result.report.passed and (tmp_path / "o" / "README.md").is_file()
    assert (tmp_path / "o" / "validation.json").is_file()
    assert [e for e in events if e != "info"] == ["converted", "validated"]


def test_api_checks_come_before_any_work(tmp_path):
    """Each check that can fail after converting fails first, with the API's own words."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.txt").write_text("mine")
    cases = [
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "taken"), OutputExists),
        (jobs.Job("tiny-flux", "torchao", "int9", out=tmp_path / "a"), UsageError),
        (jobs.Job("tiny-flux", "gguf", "Q8_0", out=tmp_path / "b", options={"layout": "bfl"}), InputError),
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "c", thresholds={"min_psrn": 3}), UsageError),
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "d", push=jobs.PushTarget(repo_id="bad..id")), UsageError),
    ]
    for job, error in cases:
        with pytest.raises(error):
            jobs.run(job)
        assert not job.out_dir.exists() or job.out_dir.name == "taken"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failed_validation_raises_and_keeps_the_output(tmp_path):
    job = jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "o", thresholds={"min_psnr": 1000}, card=True)
    with pytest.raises(ValidationFailed, match="psnr"):
        jobs.run(job)
    assert (tmp_path / "o" / "validation.json").is_file() and not (tmp_path / "o" / "README.md").exists()


PLAN = GOOD  # one torchao int8wo variant "a" of tiny-flux, namespace acme


def _release(tmp_path, text, hub, *extra):
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    return run_cli("-q", "release", str(plan), "--workdir", str(tmp_path / "work"), *extra, env=env)


@pytest.mark.parametrize(
    "variant, code, needle",
    [
        ('name = "b"\nbackend = "torchao"\nscheme = "fp8wo"\nrepo_id = "someone-else/x"\n', 5, "someone-else"),
        ('name = "b"\nbackend = "gguf"\nscheme = "Q8_0"\noptions = { layout = "bfl" }\n', 3, "width 3072"),
    ],
    ids=["push-target-not-writable", "output-not-loadable"],
)
def test_a_release_gets_the_cli_checks_before_converting_anything(variant, code, needle, hub, tmp_path):
    """The second variant's push target or loadability is wrong: the release fails before the
    first variant converts (nothing in the work folder, nothing on the Hub)."""
    proc = _release(tmp_path, PLAN + "\n[[variant]]\n" + variant, hub, "--push")
    assert_one_line_error(proc, code=code, contains=needle)
    work = tmp_path / "work"
    assert not work.exists() or not any(p.name in ("a", "b") for p in work.iterdir())
    assert not hub.repo_exists("acme/tiny-flux-a")


def test_release_and_cli_write_the_same_output(hub, tmp_path):
    """One job behind both: a release variant and the equivalent `qconvert flux` give the same files."""
    proc = _release(tmp_path, PLAN, hub)
    assert proc.returncode == 0, proc.stderr
    flux = run_cli("-q", "flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                   "--out", str(tmp_path / "cli"))  # fmt: skip
    assert flux.returncode == 0, flux.stderr
    a = json.loads((tmp_path / "work" / "a" / "qconvert.json").read_text())
    b = json.loads((tmp_path / "cli" / "qconvert.json").read_text())
    assert a["components"] == b["components"] and a["options"] == b["options"]


def test_push_needs_a_namespace_it_can_tell(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    job = jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "o", push=jobs.PushTarget(),
                   endpoint="http://127.0.0.1:9")  # fmt: skip
    with pytest.raises(AuthError, match="namespace"):
        jobs.check(job)


# --- errors in the caller's terms -------------------------------------------------------------


def _api_and_cli_text(job: jobs.Job, error: type) -> tuple[str, str]:
    from qconvert.cli import cli_wording

    with pytest.raises(error) as e:
        jobs.run(job)
    return str(e.value), e.value.one_line(cli_wording)


def test_api_errors_name_arguments_where_the_cli_names_flags(tmp_path):
    """The job's errors name Job arguments for a Python caller, the same flags as ever for the CLI."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.txt").write_text("mine")
    cases = [
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "taken"), OutputExists,
         "(pass `overwrite=True` or choose another `out`)", "(pass --overwrite or choose another --out)"),
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "taken", overwrite=True), OutputExists,
         "`overwrite=True` would delete", "--overwrite would delete"),
        (jobs.Job("tiny-flux", "gguf", "Q8_0", out=tmp_path / "b", options={"layout": "bfl"}), InputError,
         "convert with `layout='diffusers'` to validate it, or pass `validate=False`",
         "convert with --layout diffusers to validate it, or pass --no-validate"),
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "c", options={"compute_dtype": "bf16"}), UsageError,
         "does not take 'compute_dtype' (`compute_dtype`)", "does not take 'compute_dtype' (--compute-dtype)"),
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "d", components=()), UsageError,
         "`components` is empty", "--components is empty"),
        (jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "e", base="tiny-flux"), UsageError,
         "`base` is for a single-file `source`; tiny-flux is a whole pipeline (drop `base`)",
         "--base is for a single-file --source; tiny-flux is a whole pipeline (drop --base)"),
    ]
    for job, error, api, cli in cases:
        api_text, cli_text = _api_and_cli_text(job, error)
        assert api in api_text and "--" not in api_text, api_text
        assert cli in cli_text, cli_text


def test_a_failed_validation_names_the_thresholds_in_the_callers_terms(tmp_path):
    from qconvert.cli import cli_wording

    job = jobs.Job("tiny-flux", "torchao", "int8wo", out=tmp_path / "o", thresholds={"min_psnr": 1000})
    with pytest.raises(ValidationFailed) as e:
        jobs.run(job)
    assert "(convert again with `overwrite=True`); limits: `thresholds_file=FILE` or `thresholds`)" in str(e.value)
    assert e.value.one_line(cli_wording).endswith(
        "(convert again with --overwrite); limits: --thresholds FILE or the --min-*/--max-* flags of `qconvert validate`)"
    )


def test_the_cli_words_the_same_errors_as_flags(tmp_path):
    (tmp_path / "taken").mkdir()
    proc = run_cli("flux", "--source", "tiny-flux", "--backend", "torchao", "--scheme", "int8wo",
                   "--out", str(tmp_path / "taken"))  # fmt: skip
    line = assert_one_line_error(proc, code=2)
    assert line == f"error: output {(tmp_path / 'taken').absolute()} already exists (pass --overwrite or choose another --out)"
