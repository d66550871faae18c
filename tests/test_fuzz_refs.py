"""Fuzz (Hypothesis): references and names, wherever one is parsed (issue 22).

The contract for any text in a reference's or a name's place: it resolves, or it is refused
with one :class:`LBMError` (Python) / one line and exit 2 (CLI), short whatever the input's
length, and nothing in the registry changes. The default run draws a few dozen seeded examples
per property; ``-m slow`` draws many more at random (see ``tests/fixtures/fuzzing.py``).
"""

from __future__ import annotations

import json

import pytest
from fixtures.fuzzing import fuzz_settings, fuzz_settings_slow, hostile_text, references
from hypothesis import given
from hypothesis import strategies as st

from lbm_registry.errors import LBMError

NAMES = ["relight", "sdxl-base", "tuned", "nope"]
ALIASES = ["prod", "staging"]
MAX_LINE = 600     # a refusal is one line of at most this many characters, whatever the input


def registry_state(settings) -> str:
    """Everything a refused command must leave as it was: assets, versions, aliases, blobs."""
    from lbm_registry.api import registry as R

    blobs = sorted(p.name for p in (settings.home / "blobs").rglob("*") if p.is_file())
    return json.dumps({"assets": R.list_assets(settings), "blobs": blobs}, sort_keys=True, default=str)


def check_refusal(message: str) -> None:
    assert "\n" not in message.strip() and len(message) <= MAX_LINE, message[:2000]


def _resolve_any(populated, ref: str) -> None:
    from lbm_registry.api import registry as R

    try:
        R.resolve(ref, populated["settings"])
    except LBMError as exc:   # anything else (OverflowError, OSError, RuntimeError...) fails the test
        check_refusal(str(exc))
        check_refusal(exc.cli_message)


def _name_rules(name: str) -> None:
    from lbm_registry.registry.refs import NAME_RE, VERSION_RE, name_problem

    why = name_problem(name)
    if why is None:
        assert NAME_RE.fullmatch(name) and not VERSION_RE.fullmatch(name), name
        assert name.lower() not in ("latest", "sha256")
    else:
        check_refusal(why)


@fuzz_settings(50)
@given(ref=references(NAMES, ALIASES))
def test_any_reference_resolves_or_is_one_lbm_error(populated, ref):
    _resolve_any(populated, ref)


@pytest.mark.slow
@fuzz_settings_slow(3000)
@given(ref=references(NAMES, ALIASES))
def test_any_reference_resolves_or_is_one_lbm_error_many(populated, ref):
    _resolve_any(populated, ref)


@fuzz_settings(150)
@given(name=st.one_of(hostile_text(30), references(NAMES, ALIASES)))
def test_name_rules_never_raise_and_say_why(name):
    _name_rules(name)


@pytest.mark.slow
@fuzz_settings_slow(5000)
@given(name=st.one_of(hostile_text(300), references(NAMES, ALIASES)))
def test_name_rules_never_raise_and_say_why_many(name):
    _name_rules(name)


#: Commands that take a reference (REF is replaced by the drawn text). Commands that would load a
#: model or change the registry when the text happens to resolve only get text that does not.
READ = [["show", "REF"], ["lineage", "REF"], ["layers", "REF"], ["show", "REF", "--json"]]
CHANGE = [["rm", "REF"], ["alias", "set", "REF", "fuzz-alias"], ["alias", "set", "relight@1", "REF"],
          ["alias", "rm", "relight", "REF"], ["alias", "rm", "REF", "prod"], ["export", "REF", "--format", "kohya",
                                                                             "--output", "OUT"],
          ["validate", "REF"], ["infer", "REF", "--source", "IMG", "--output", "OUT"],
          ["infer", "relight@1", "--source", "IMG", "--output", "OUT", "--lora", "REF"],
          ["compare", "REF", "relight@1", "--source", "IMG"], ["merge", "REF", "relight@1", "--output", "OUT"],
          ["import", "IMG", "--name", "REF", "--kind", "base"], ["pull", "REF"]]


def _cli_refusal(cli, populated, tmp_path, args: list[str], ref: str) -> None:
    from lbm_registry.api import registry as R
    from lbm_registry.registry.refs import name_problem

    s = populated["settings"]
    if args in CHANGE or args[0] == "import":
        try:   # text that names something real could do real work: the contract is about refusals
            R.resolve(ref, s)
            return
        except LBMError:
            pass
        if args[0] in ("alias", "import") and name_problem(ref) is None:
            return
    img = tmp_path / "in.png"
    if not img.exists():
        from PIL import Image

        Image.new("RGB", (8, 8)).save(img)
    argv = [{"REF": ref, "IMG": str(img), "OUT": str(tmp_path / "out.safetensors")}.get(a, a) for a in args]
    before = registry_state(s)
    rc, out, err = cli("--home", s.home, *argv)
    if rc == 0:
        assert args in READ, (argv, out)
        return
    assert rc == 2, (argv, rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    if lines and lines[0].startswith("Usage:"):   # click's usage message (e.g. a text that looks like an option)
        assert len(lines) <= 6, err
    else:
        assert len(lines) == 1 and len(lines[0]) <= MAX_LINE + 10, err[:3000]
    if "--json" in argv:
        assert set(json.loads(out)) == {"error", "code"}, out
    else:
        assert out == "", out
    assert registry_state(s) == before
    assert not (tmp_path / "out.safetensors").exists()


@fuzz_settings(30)
@given(args=st.sampled_from(READ + CHANGE), ref=references(NAMES, ALIASES))
def test_every_command_taking_a_reference_refuses_in_one_line(cli, populated, tmp_path, args, ref):
    _cli_refusal(cli, populated, tmp_path, args, ref)


@pytest.mark.slow
@fuzz_settings_slow(800)
@given(args=st.sampled_from(READ + CHANGE), ref=references(NAMES, ALIASES))
def test_every_command_taking_a_reference_refuses_in_one_line_many(cli, populated, tmp_path, args, ref):
    _cli_refusal(cli, populated, tmp_path, args, ref)


def test_the_registry_is_healthy_after_the_fuzzing(populated):
    from lbm_registry.api.registry import doctor

    report = doctor(populated["settings"])
    assert report["remaining"] == 0, report["issues"]
