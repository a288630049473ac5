"""The registry of reason codes (pipeline/reasons.py) against the code that produces them
and the table in docs/reasons.md.

The producers are found by reading the source with ``ast``, not by running it: every
``NotAnalysable(code, ...)``, every ``refused(study, status, code, ...)`` and
``_replace(worker, status, code)`` of the pools, every ``reasons=(...)`` given to a result,
every read problem set on a damaged file (``setattr(ds, READ_PROBLEM_ATTRIBUTE, code)``),
and selection's ``reasons.append(code)`` / ``return (code, ...)`` / ``_refuse_study``.  A
code held in a variable is followed to its assignments in the same function; a value that
comes from elsewhere (a parameter, ``e.code``, ``read_problem(ds)``) is produced, and
checked, where it was made.
"""

from __future__ import annotations

import ast
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import reasons
from pipeline.artefacts import Status
from pipeline.errors import NotAnalysable
from pipeline.reasons import BY_STEM, REASONS, Reason, render_table
from pipeline.state import State, _done

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"
DOC = REPO / "docs" / "reasons.md"

# call name -> position of the argument that is a reason code (or a tuple of them)
CODE_ARGUMENT = {"NotAnalysable": 0, "refused": 2, "_replace": 2, "_refuse_study": 1}
# where a value comes from another producer (checked there) or from the caller
PASSTHROUGH_CALLS = {"read_problem", "_read_problems"}
PASSTHROUGH_ATTRIBUTES = {"code", "reasons", "read_problem"}


@dataclass(frozen=True)
class Produced:
    code: str  # a literal code, or an f-string's literal prefix followed by "{...}"
    status: str | None  # "not-analysed" / "failed" where the site says so
    where: str

    @property
    def stem(self) -> str:
        return self.code.split(":", 1)[0]


class Dynamic(Exception):
    """A reason code whose value the scan cannot follow."""


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _status_of(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
            and node.value.id == "Status":
        return str(Status[node.attr].value)
    return None


class _Scan:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rel = path.relative_to(REPO).as_posix()
        self.tree = ast.parse(path.read_text(encoding="utf-8"))
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        self.found: list[Produced] = []
        self.dynamic: list[str] = []

    def _function(self, node: ast.AST) -> ast.AST:
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return self.tree

    def values(self, expr: ast.expr, scope: ast.AST,
               status: str | None) -> list[tuple[str, str | None]]:
        """The codes ``expr`` can hold, each with the status it comes with where known."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [(expr.value, status)]
        if isinstance(expr, ast.JoinedStr):
            head = expr.values[0] if expr.values else None
            if isinstance(head, ast.Constant) and ":" in str(head.value):
                return [(str(head.value) + "{...}", status)]
            raise Dynamic("an f-string that does not start with '<stem>:'")
        if isinstance(expr, ast.IfExp):
            return self.values(expr.body, scope, status) + self.values(expr.orelse, scope, status)
        if isinstance(expr, ast.Tuple | ast.List):
            return [v for e in expr.elts for v in self.values(e, scope, status)]
        if isinstance(expr, ast.Starred):
            return self.values(expr.value, scope, status)
        if isinstance(expr, ast.Call) and (
            _call_name(expr) in PASSTHROUGH_CALLS or _call_name(expr).endswith("reasons")
        ):
            return []  # read problems, or a function of reasons (scanned itself)
        if isinstance(expr, ast.Attribute) and expr.attr in PASSTHROUGH_ATTRIBUTES:
            return []
        if isinstance(expr, ast.Name):
            return self._name(expr.id, scope, status)
        raise Dynamic(f"a {type(expr).__name__} expression")

    def _name(self, name: str, scope: ast.AST,
              status: str | None) -> list[tuple[str, str | None]]:
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
            a = scope.args
            if name in {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}:
                return []  # the caller's value: produced (and scanned) at the call
        out: list[tuple[str, str | None]] = []
        assigned = False
        for node in ast.walk(scope):
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == name:
                    assigned = True
                    out += self.values(node.value, scope, status)
                elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    names = [t.id if isinstance(t, ast.Name) else "" for t in target.elts]
                    if name in names:
                        assigned = True
                        pair = dict(zip(names, node.value.elts, strict=True))
                        out += self.values(pair[name], scope,
                                           _status_of(pair.get("status")) or status)
        if not assigned:
            raise Dynamic(f"the name {name!r}, assigned nowhere in its function")
        return out

    def add(self, expr: ast.expr, node: ast.AST, status: str | None) -> None:
        where = f"{self.rel}:{getattr(node, 'lineno', '?')}"
        try:
            vals = self.values(expr, self._function(node), status)
        except Dynamic as e:
            self.dynamic.append(f"{where}: {e}")
            return
        self.found += [Produced(code, st, where) for code, st in vals]

    def run(self) -> _Scan:
        selection = self.rel == "pipeline/selection.py"
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                name = _call_name(node)
                if name in CODE_ARGUMENT and len(node.args) > CODE_ARGUMENT[name]:
                    status = {"NotAnalysable": "not-analysed",
                              "_refuse_study": "not-analysed"}.get(name)
                    if name in ("refused", "_replace"):
                        status = _status_of(node.args[1])
                    self.add(node.args[CODE_ARGUMENT[name]], node, status)
                elif (name == "setattr" and len(node.args) == 3
                      and isinstance(node.args[1], ast.Name)
                      and node.args[1].id == "READ_PROBLEM_ATTRIBUTE"):
                    self.add(node.args[2], node, "not-analysed")
                elif (name in ("append", "extend") and isinstance(node.func, ast.Attribute)
                      and isinstance(node.func.value, ast.Name)
                      and node.func.value.id == "reasons" and node.args):
                    self.add(node.args[0], node, "not-analysed")
                keywords = {k.arg: k.value for k in node.keywords if k.arg}
                value = keywords.get("reasons")
                if isinstance(value, ast.Tuple | ast.List):
                    self.add(value, node, _status_of(keywords.get("status")))
            elif (selection and isinstance(node, ast.Return)
                  and isinstance(node.value, ast.Tuple)):
                func = self._function(node)
                if getattr(func, "name", "").endswith("reasons"):
                    self.add(node.value, node, "not-analysed")
        return self


def _scan() -> tuple[list[Produced], list[str]]:
    found: list[Produced] = []
    dynamic: list[str] = []
    for path in sorted(PIPELINE.rglob("*.py")):
        s = _Scan(path).run()
        found += s.found
        dynamic += s.dynamic
    return found, dynamic


PRODUCED, DYNAMIC = _scan()


def test_the_scan_finds_the_producers_it_is_meant_to() -> None:
    codes = {p.code for p in PRODUCED}
    # one of each kind of site, so that a change in how codes are written is noticed
    for expected in (
        "slice-too-thick:{...}",  # selection: reasons.append(f"...")
        "localizer",  # selection: return ("localizer",)
        "missing-study-uid",  # selection: _refuse_study(study, (*problems, "..."))
        "gantry-tilt:{...}",  # volume: NotAnalysable(f"...")
        "no-lungs-found",  # lungs: NotAnalysable("...")
        "truncated-file",  # folder archive: setattr(ds, READ_PROBLEM_ATTRIBUTE, problem)
        "incomplete-retrieval:{...}",  # archive: NotAnalysable(f"...")
        "limit-exceeded:slices",  # run: NotAnalysable("...")
        "limit-exceeded:memory",  # workers: code, status = "...", Status.NOT_ANALYSED
        "internal-error:{...}",  # workers: code, status = f"...", Status.FAILED
        "worker-died:{...}",  # workers: self._replace(w, Status.FAILED, f"...")
        "lease-lost",  # workers: refused(study, Status.FAILED, "lease-lost", version)
        "archive-error",  # batch: replace(result, status=..., reasons=("archive-error",))
    ):
        assert expected in codes, f"the scan no longer finds {expected!r}"


def test_every_code_site_can_be_followed() -> None:
    assert DYNAMIC == [], (
        "reason codes the scan cannot follow (write the code as a literal or an f-string "
        "starting with '<stem>:', or teach tests/test_reasons.py the new kind of site):\n"
        + "\n".join(DYNAMIC)
    )


def test_every_code_produced_is_registered() -> None:
    missing = sorted({f"{p.stem} ({p.where})" for p in PRODUCED if p.stem not in BY_STEM})
    assert missing == [], (
        "reason codes produced in pipeline/ but not registered in pipeline/reasons.py "
        "(add a Reason, then run python -m pipeline.reasons --write docs/reasons.md):\n"
        + "\n".join(missing)
    )


def test_every_registered_code_is_produced() -> None:
    produced = {p.stem for p in PRODUCED}
    unused = sorted(r.stem for r in REASONS if r.stem not in produced)
    assert unused == [], f"registered in pipeline/reasons.py but produced nowhere: {unused}"


def test_a_code_has_a_detail_exactly_where_the_registry_gives_one() -> None:
    wrong = sorted(
        f"{p.code} ({p.where}): registry says {BY_STEM[p.stem].code!r}"
        for p in PRODUCED
        if p.stem in BY_STEM and (":" in p.code) != bool(BY_STEM[p.stem].detail)
    )
    assert wrong == []


def test_the_status_a_site_gives_is_the_registered_one() -> None:
    wrong = sorted(
        f"{p.code} ({p.where}): {p.status}, registry says {BY_STEM[p.stem].status}"
        for p in PRODUCED
        if p.stem in BY_STEM and p.status is not None and p.status != BY_STEM[p.stem].status
    )
    assert wrong == []


def test_the_registry_is_well_formed() -> None:
    stems = [r.stem for r in REASONS]
    assert len(stems) == len(set(stems)), "a stem registered twice"
    statuses = {Status.NOT_ANALYSED.value, Status.FAILED.value}
    for r in REASONS:
        assert r.stem == r.stem.strip().lower() and ":" not in r.stem and " " not in r.stem
        assert r.meaning and r.action, r.stem
        assert r.status in statuses, r.stem
        assert "\n" not in r.meaning + r.action + r.detail, r.stem


@pytest.mark.parametrize("reason", [r for r in REASONS if r.scope == "study"],
                         ids=lambda r: r.stem)
def test_screened_again_is_what_the_state_store_does(reason: Reason) -> None:
    """The "screened again" column against the rule the batch applies (state._done)."""
    state = State.FAILED if reason.status == "failed" else State.NOT_ANALYSED
    code = f"{reason.stem}:x" if reason.detail else reason.stem
    done_same_limits = _done(state, [code], same_input=True, same_limits=True)
    done_new_limits = _done(state, [code], same_input=True, same_limits=False)
    retry = ("no" if done_new_limits else
             "when the limits change" if done_same_limits else "next run")
    assert reason.retry == retry
    assert not _done(state, [code], same_input=False, same_limits=True)  # changed input


def test_docs_table_is_the_rendered_registry() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert text.count(reasons.BEGIN) == 1 and text.count(reasons.END) == 1
    assert reasons.generated_part(text) == render_table(), (
        "docs/reasons.md is out of date: run python -m pipeline.reasons --write docs/reasons.md"
    )


def test_every_registered_code_is_in_the_table() -> None:
    table = render_table()
    for r in REASONS:
        assert f"`{r.code.replace('|', chr(92) + '|')}`" in table, r.stem


def test_write_and_check_regenerate_only_the_marked_part(tmp_path: Path) -> None:
    doc = tmp_path / "reasons.md"
    doc.write_text(f"# title\n\nprose\n\n{reasons.BEGIN}\nstale\n{reasons.END}\n\nafter\n")
    assert reasons.main(["--check", str(doc)]) == 1
    assert reasons.main(["--write", str(doc)]) == 0
    assert reasons.main(["--check", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# title\n\nprose\n\n") and text.endswith(f"{reasons.END}\n\nafter\n")
    assert "stale" not in text and render_table() in text


def test_an_unregistered_code_is_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.errors"):
        e = NotAnalysable("no-such-reason:1", "a sentence")
        NotAnalysable("slice-too-thick:5.0mm", "a sentence")
    assert (e.code, e.message) == ("no-such-reason:1", "a sentence")
    assert [r.getMessage() for r in caplog.records] == [
        "reason code 'no-such-reason:1' is not registered in pipeline/reasons.py"
    ]
    back = pickle.loads(pickle.dumps(NotAnalysable("missing-slices:gap=3.0mm", "gap")))
    assert (back.code, back.message) == ("missing-slices:gap=3.0mm", "gap")
