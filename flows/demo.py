"""``kiln demo`` (what ``make demo`` runs): Kiln's whole journey on one machine, end to end.

1. ``dvc repro`` reproduces the example data and models, and the two flawed digits versions
   (``data/build_digits_variants.py``);
2. the Prefect flow ``register-examples`` uploads the examples (digits becomes 0.1.0);
3. ``kiln serve`` starts (gateway + supervisor) on a free port, in its own process group;
4. the Prefect flow ``deploy-model`` takes digits 0.1.0 through optimize and the gates to
   production; Kiln prints the variant table, then sends real test digits through the gateway
   and prints the predictions against the labels;
5. ``deploy-model`` with 0.2.0 (the head's weights permuted): the champion/challenger gate
   rejects it before any traffic reaches it;
6. ``deploy-model`` with 0.3.0 (the same answers, tens of ms slower per call on every
   backend): the canary rolls it back on p99;
7. the gateway stops; the summary is printed and written to ``$KILN_HOME/demo-summary.json``.

Re-running it on the same ``KILN_HOME`` is safe: versions already decided report their state
(``deploy-model`` is idempotent), and it still exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from kiln.net import redact_url
from kiln.processes import ExitedEarly, ReadyTimeout, http_ok, start_group, stop_group, wait_ready
from kiln.settings import Settings, apply_privacy_env, get_settings

# The example data and models, and the demo's flawed digits versions (dvc.yaml stages).
DEMO_STAGES = ("train_digits", "train_breast_cancer", "build_minilm", "build_digits_variants")
TEST_SPLIT = "data/digits/test.npz"
VAL_SPLIT = "data/digits/val.npz"
SHOWN_DIGITS = 20  # rows in the predictions table (the accuracy uses the whole test split)
# Short canary steps, so the demo's rollback takes seconds rather than minutes.
CANARY_STEPS = [0.2, 0.5, 1.0]
STEP_SECONDS = 8.0
# The flawed versions build ONNX Runtime variants only (0.1.0 shows every backend): AOTInductor's
# C++ compile would add about a minute to the demo and change none of its outcomes.
FLAWED_OPTIMIZE = {"backends": ["onnxruntime"]}
WIDTH = 120  # columns when the output is not a terminal (a log, a pipe)


@dataclass(frozen=True)
class Flawed:
    """A deliberately flawed digits version, and the guard that must stop it."""

    version: str
    source: str  # relative to the project, built by `dvc repro build_digits_variants`
    expected: str  # deploy-model's outcome
    story: str


FLAWED: tuple[Flawed, ...] = (
    Flawed(
        "0.2.0",
        "data/digits/variants/permuted.pt2",
        "rejected",
        "the head's weights permuted: every logit belongs to the wrong digit",
    ),
    Flawed(
        "0.3.0",
        "data/digits/variants/slow.pt2",
        "rolled_back",
        "the same answers, but a chain of float64 matmuls on every call",
    ),
)


class LocalGateway:
    """``kiln serve`` (gateway + supervisor) as a child in its own process group.

    Lifecycle: ``start()`` picks a free port, points this process's settings at it and
    launches the child; ``wait_ready()`` polls ``/v2/health/ready``; ``stop()`` sends SIGTERM to
    the whole group (the engines drain and stop with it), SIGKILL after a grace period, and
    restores the port setting. Use it as a context manager.
    """

    def __init__(self, settings: Settings, log_path: Path) -> None:
        from serving.supervisor import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._settings = settings
        self._proc: subprocess.Popen[bytes] | None = None
        self._previous_port = os.environ.get("KILN_GATEWAY_PORT")

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        # this process's flows find the gateway through the same setting
        os.environ["KILN_GATEWAY_PORT"] = str(self.port)
        get_settings.cache_clear()
        env = {**os.environ, "KILN_HOME": str(self._settings.home)}
        self._proc = start_group(
            [*_kiln_command(), "serve", "--port", str(self.port)], env=env, log_path=self.log_path
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        if self._proc is None:
            raise RuntimeError(f"kiln serve exited early: see {self.log_path}")
        try:
            wait_ready(
                self._proc,
                http_ok(self.url + "/v2/health/ready"),
                timeout_s=timeout_s,
                what="kiln serve",
            )
        except ExitedEarly:
            raise RuntimeError(f"kiln serve exited early: see {self.log_path}") from None
        except ReadyTimeout:
            raise RuntimeError(
                f"kiln serve was not ready within {timeout_s:.0f} s: see {self.log_path}"
            ) from None

    def stop(self, grace_s: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:  # the engines drain and stop with the supervisor
            stop_group(proc, timeout_s=grace_s)
        if self._previous_port is None:
            os.environ.pop("KILN_GATEWAY_PORT", None)
        else:
            os.environ["KILN_GATEWAY_PORT"] = self._previous_port
        get_settings.cache_clear()


def _kiln_command() -> list[str]:
    script = Path(sys.executable).with_name("kiln")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from kiln.cli import app; app()"]


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the gateway we started is stopped either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Demo:
    """One run of the journey: its consoles, its settings, and what each step decided."""

    def __init__(self, project: Path) -> None:
        self.project = project.absolute()
        self.out = Console()
        self.err = Console(stderr=True)
        for console in (self.out, self.err):
            if not console.is_terminal:
                console.width = WIDTH
        self.settings = get_settings()
        self.started = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.accuracy: float | None = None
        self.served_version: str | None = None

    # ------------------------------------------------------------------ the steps
    def reproduce(self) -> bool:
        self.heading(
            "1. dvc repro",
            "example data and models, and the flawed digits versions (cached after the first run)",
        )
        dvc = Path(sys.executable).with_name("dvc")
        env = {**os.environ, "PATH": f"{dvc.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.run(
            [str(dvc), "repro", *DEMO_STAGES], cwd=self.project, env=env, check=False
        )
        if proc.returncode != 0:
            self.err.print("[red]error:[/red] dvc repro failed: see its output above")
            return False
        return True

    def register(self) -> str:
        """Upload the examples; returns digits' version (0.1.0 in a fresh KILN_HOME)."""
        from flows.register import register_examples

        self.heading(
            "2. register-examples",
            "a Prefect flow: upload + Great Expectations checks of each dataset",
        )
        results = register_examples(project=str(self.project))
        table = Table("model", "version", "status", "sha256", "dataset check", title="registered")
        for r in results:
            ds = r["dataset"]
            table.add_row(
                r["name"],
                r["version"],
                r["status"],
                r["sha256"][:16],
                "passed" if ds and ds["check_passed"] else "failed" if ds else "-",
            )
        self.out.print(table)
        return str(next(r["version"] for r in results if r["name"] == "digits"))

    def deploy_champion(self, version: str) -> dict[str, Any]:
        from flows.deploy import deploy_model

        self.heading(
            f"4. deploy-model digits@{version}",
            "a Prefect flow: optimize (extract, quantize, compile, validate, select), "
            "the gates, then production (the model's first version goes direct)",
        )
        result = self._run(lambda: deploy_model("digits", version), "digits", version)
        self._record(result, expected="promoted")
        self.out.print(variant_table(self.settings, "digits", result["version"]))
        return result

    def predict(self, gateway: LocalGateway) -> None:
        from kiln.registry import crud
        from kiln.registry.db import session_scope

        self.heading(
            "   real test digits through the gateway", "OIP v2 JSON with an infer-scope API key"
        )
        with session_scope(self.settings.db_url) as session:
            issued = crud.create_api_key(session=session, scopes=["infer"], models=["digits"])
            key, prefix = issued.key, issued.row.prefix
        try:
            with np.load(self.project / TEST_SPLIT, allow_pickle=False) as npz:
                x, labels = npz["inputs"].astype(np.float32), npz["labels"]
            with httpx.Client(
                base_url=gateway.url, timeout=30.0, headers={"Authorization": f"Bearer {key}"}
            ) as client:
                shown, version = infer_digits(client, x[:SHOWN_DIGITS])
                every, _ = infer_digits(client, x)
        finally:
            with session_scope(self.settings.db_url) as session:
                crud.revoke_api_key(session=session, prefix=prefix)
        self.out.print(
            predictions_table(
                shown,
                labels[:SHOWN_DIGITS],
                title=f"{SHOWN_DIGITS} test digits, answered by digits@{version} (green: right)",
            )
        )
        self.accuracy = float(np.mean(every.argmax(axis=1) == labels))
        self.served_version = version
        shown_ok = int(np.sum(shown.argmax(axis=1) == labels[:SHOWN_DIGITS]))
        self.out.print(
            f"{shown_ok}/{SHOWN_DIGITS} right above; accuracy over the whole test "
            f"split ({len(labels)} digits, one request): [bold]{self.accuracy:.1%}"
            "[/bold]"
        )

    def deploy_flawed(self, number: int, flawed: Flawed, champion: str) -> None:
        from flows.deploy import deploy_model

        self.heading(
            f"{number}. deploy-model digits@{flawed.version}",
            f"{flawed.story}; expected: {flawed.expected.replace('_', ' ')}",
        )
        source = str(self.project / flawed.source)
        dataset = str(self.project / VAL_SPLIT)
        result = self._run(
            lambda: deploy_model(
                "digits",
                flawed.version,
                source=source,
                dataset=dataset,
                canary_steps=CANARY_STEPS,
                step_seconds=STEP_SECONDS,
            ),
            "digits",
            flawed.version,
        )
        self._record(result, expected=flawed.expected)
        chosen = selected_summary(self.settings, "digits", flawed.version)
        before = selected_summary(self.settings, "digits", champion)
        if chosen and before:
            self.out.print(
                f"optimize selected {chosen} (digits@{champion}: {before}); its "
                "gates compare variants with the version's own baseline",
                highlight=False,
            )
        gate = result.get("gate") or {}
        if "champion_metric" in gate:
            table = Table(
                "",
                "version",
                gate["metric"],
                title=f"champion/challenger gate on {gate.get('dataset', 'the validation data')}",
            )
            table.add_row("champion", str(gate["champion"]), f"{gate['champion_metric']:.4f}")
            table.add_row("challenger", str(gate["candidate"]), f"{gate['candidate_metric']:.4f}")
            self.out.print(table)
        if result.get("steps"):
            self.out.print(steps_table(result["steps"]))
        colour = "green" if result["outcome"] == flawed.expected else "red"
        self.out.print(
            f"[{colour}]{result['outcome']}[/{colour}]: {self.steps[-1]['reason']}", highlight=False
        )
        self.out.print(
            f"digits is still served by {self._stable() or '-'} (production before: {champion})"
        )

    def summary(self) -> int:
        seconds = round(time.monotonic() - self.started, 1)
        table = Table("version", "outcome", "expected", "reason", title="kiln demo: summary")
        failed = []
        for step in self.steps:
            ok = step["outcome"] == step["expected"]
            if not ok:
                failed.append(step["version"])
            colour = "green" if ok else "red"
            table.add_row(
                step["version"],
                f"[{colour}]{step['outcome']}[/{colour}]",
                step["expected"],
                step["reason"],
            )
        self.out.print(table)
        doc = {
            "steps": [
                {k: s[k] for k in ("version", "outcome", "reason", "expected")} for s in self.steps
            ],
            "accuracy": self.accuracy,
            "served_version": self.served_version,
            "stable": self._stable(),
            "seconds": seconds,
        }
        path = self.settings.home / "demo-summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        self.out.print(f"{seconds:.0f} s; summary: {path}")
        self.out.print(
            f"registry: {redact_url(self.settings.db_url)}   artifacts: {self.settings.home / 'objects'}"
        )
        self.out.print("try: .venv/bin/kiln models, .venv/bin/kiln show digits@0.3.0 --json")
        if failed:
            self.err.print(
                f"[red]error:[/red] {', '.join(failed)} did not end as the demo "
                "expects: see the reasons above"
            )
            return 1
        return 0

    @contextmanager
    def optimize_settings(self, optimize: dict[str, Any]) -> Iterator[None]:
        """digits' ``optimize`` settings replaced for a while, then put back as they were."""
        from kiln.registry import crud
        from kiln.registry.db import session_scope

        with session_scope(self.settings.db_url) as session:
            model = crud.require_model(session=session, name="digits")
            previous = dict((model.settings or {}).get("optimize", {}))
            crud.update_model_settings(
                session=session, model=model, settings={"optimize": {**previous, **optimize}}
            )
        self.err.print(
            f"(digits' later versions: optimize settings {optimize}, to keep the "
            "demo short; put back afterwards)",
            highlight=False,
        )
        try:
            yield
        finally:
            with session_scope(self.settings.db_url) as session:
                model = crud.require_model(session=session, name="digits")
                crud.update_model_settings(
                    session=session, model=model, settings={"optimize": previous}
                )

    # ------------------------------------------------------------------ helpers
    def heading(self, title: str, detail: str) -> None:
        self.err.print(f"[bold]{title}[/bold]: {detail}", highlight=False)

    def _record(self, result: dict[str, Any], *, expected: str) -> None:
        reason = result["reason"]
        if result["outcome"] != "promoted" and not result.get("gate") and not result.get("steps"):
            # decided by an earlier run (deploy-model reports the state): say why it was
            earlier = self._decision_reason(result["version"])
            if earlier:
                reason = f"{earlier} (decided by an earlier run)"
        self.steps.append(
            {
                "version": result["version"],
                "outcome": result["outcome"],
                "reason": reason,
                "expected": expected,
            }
        )

    def _decision_reason(self, version: str) -> str | None:
        """The reason of the latest rejection or rollback of digits@version, from the
        deployment's history."""
        from kiln.registry import crud
        from kiln.registry.db import session_scope

        with session_scope(self.settings.db_url) as session:
            model = crud.get_model(session=session, name="digits")
            dep = crud.get_deployment(session=session, model=model) if model else None
            if dep is None:
                return None
            for event in reversed(crud.list_deployment_events(session=session, deployment=dep)):
                if (
                    event.kind in ("rejected", "rollback")
                    and (event.detail or {}).get("version") == version
                ):
                    return event.reason
        return None

    def _stable(self) -> str | None:
        from kiln.registry import crud
        from kiln.registry.db import session_scope

        with session_scope(self.settings.db_url) as session:
            model = crud.get_model(session=session, name="digits")
            dep = crud.get_deployment(session=session, model=model) if model else None
            if dep is None or dep.stable_version_id is None:
                return None
            row = crud.get_version_by_id(session=session, version_id=dep.stable_version_id)
            return row.version if row else None

    def _run(self, work: Callable[[], dict[str, Any]], name: str, version: str) -> dict[str, Any]:
        """Run a flow in a thread and draw a progress bar from its optimize jobs meanwhile."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from kiln.registry.views import job_progress

        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["doc"] = work()
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=target, daemon=True, name=f"demo-{name}-{version}")
        thread.start()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[jobs]}"),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
        ) as bar:
            task = bar.add_task(f"{name}@{version}", total=100, jobs="")
            while thread.is_alive():
                thread.join(timeout=0.5)
                progress = job_progress(self.settings, name=name, version=version)
                bar.update(
                    task,
                    completed=progress.percent,
                    jobs=progress.running
                    or ("gates, serving" if progress.percent else "uploading"),
                )
        if "error" in result:
            raise result["error"]
        return result["doc"]  # type: ignore[no-any-return]


def infer_digits(
    client: httpx.Client, x: np.ndarray, wait_s: float = 60.0
) -> tuple[np.ndarray, str]:
    """Logits for ``x`` ([n, 1, 8, 8] float32) from the gateway, and the version that answered.

    A 503 (the engine still warming up) is retried for up to ``wait_s``."""
    body = {
        "inputs": [
            {
                "name": "x",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.reshape(-1).tolist(),
            }
        ]
    }
    deadline = time.monotonic() + wait_s
    while True:
        resp = client.post("/v2/models/digits/infer", json=body)
        if resp.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if resp.status_code != 200:
        raise RuntimeError(f"the gateway answered {resp.status_code}: {resp.text[:300]}")
    doc = resp.json()
    out = doc["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]), doc["model_version"]


def predictions_table(logits: np.ndarray, labels: np.ndarray, title: str) -> Table:
    """One column per digit: its label, the prediction (green right, red wrong), confidence."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    for _ in labels:
        table.add_column(justify="right")
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    preds = logits.argmax(axis=1)
    table.add_row("label", *[str(int(y)) for y in labels])
    table.add_row(
        "predicted",
        *[
            f"[{'green' if p == y else 'red'}]{int(p)}[/]"
            for p, y in zip(preds, labels, strict=True)
        ],
    )
    table.add_row("confidence %", *[f"{100 * probs[i, p]:.0f}" for i, p in enumerate(preds)])
    return table


def selected_summary(settings: Settings, name: str, version: str) -> str | None:
    """ "backend/precision, p50 X ms at batch 1" of the variant a version's optimize selected."""
    from kiln.registry import crud
    from kiln.registry.db import session_scope

    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        runs = [
            j
            for j in crud.list_jobs(session=session, version=row)
            if j.optimization_type == "optimize" and j.status == "done" and j.metrics
        ]
        chosen = dict(runs[-1].metrics).get("selected") if runs else None
    if not chosen:
        return None
    p50 = chosen.get("latency_ms", {}).get("1", {}).get("p50")
    return f"{chosen['backend']}/{chosen['precision']}, p50 {_num(p50)} ms at batch 1"


def variant_table(settings: Settings, name: str, version: str) -> Table:
    """The version's optimize report (its run's stored job), as a rich table."""
    from kiln.registry import crud
    from kiln.registry.db import session_scope

    with session_scope(settings.db_url) as session:
        row = crud.require_version(session=session, name=name, version=version)
        runs = [
            j
            for j in crud.list_jobs(session=session, version=row)
            if j.optimization_type == "optimize" and j.status == "done" and j.metrics
        ]
        doc = dict(runs[-1].metrics) if runs else {}
    if not doc:
        table = Table(title=f"{name}@{version}: no optimize report")
        table.add_column("kiln show " + f"{name}@{version} lists its artifacts")
        return table
    chosen = doc["selected"]
    table = Table(
        title=f"{name}@{version}: variants against the fp32 eager baseline",
        caption=f"selected: {chosen['backend']}/{chosen['precision']}. {doc.get('reason', '')}",
    )
    table.add_column("variant", no_wrap=True)
    for column in (
        "accuracy",
        "drop",
        "p50 b1 ms",
        "p99 b1 ms",
        "p50 b32 ms",
        "speedup",
        "size",
        "passed",
        "why not",
    ):
        table.add_column(column)
    for v in [doc["baseline"], *doc["variants"]]:
        lat = v.get("latency_ms", {})
        selected = (v["backend"], v["precision"]) == (chosen["backend"], chosen["precision"])
        table.add_row(
            f"{v['backend']}/{v['precision']}",
            f"{v['metric']:.4f}",
            f"{v.get('metric_drop', 0.0):+.4f}",
            _ms(lat, "1", "p50"),
            _ms(lat, "1", "p99"),
            _ms(lat, "32", "p50"),
            f"{v.get('speedup') or 1.0:.2f}x",
            f"{v.get('size_bytes', 0) / 1024:.0f} KiB",
            "yes" if v.get("passed") else "no",
            "; ".join(v.get("reasons") or []),
            style="bold green" if selected else None,
        )
    return table


def steps_table(steps: list[dict[str, Any]]) -> Table:
    table = Table(
        "weight",
        "verdict",
        "canary requests",
        "canary p99 ms",
        "stable requests",
        "stable p99 ms",
        "p99 limit ms",
        "replayed",
        title="canary steps",
    )
    for step in steps:
        fig = step.get("figures", {})
        can, sta = fig.get("canary", {}), fig.get("stable", {})
        table.add_row(
            f"{step['weight']:.0%}",
            step["decision"],
            str(can.get("requests", 0)),
            _num(can.get("p99_ms")),
            str(sta.get("requests", 0)),
            _num(sta.get("p99_ms")),
            _num(fig.get("p99_limit_ms")),
            str(step.get("replayed", 0)),
        )
    return table


def _ms(latency: dict[str, Any], batch: str, q: str) -> str:
    return _num(latency.get(batch, {}).get(q))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_demo(project: Path) -> int:
    """Run the journey from ``project`` (the checkout holding dvc.yaml); the exit code."""
    apply_privacy_env()
    demo = Demo(project)
    if not demo.reproduce():
        return 6  # an external tool failed (the CLI's code for it)
    with _terminate_as_interrupt():
        champion = demo.register()
        demo.heading(
            "3. kiln serve",
            "the gateway and the supervisor of engines, on a free "
            "port (logs: $KILN_HOME/logs/demo-gateway.log)",
        )
        try:
            with LocalGateway(
                demo.settings, demo.settings.home / "logs" / "demo-gateway.log"
            ) as gateway:
                demo.err.print(f"gateway ready on {gateway.url}", highlight=False)
                demo.settings = get_settings()  # now pointing at the demo's gateway
                demo.deploy_champion(champion)
                demo.predict(gateway)
                with demo.optimize_settings(FLAWED_OPTIMIZE):
                    for number, flawed in enumerate(FLAWED, start=5):
                        demo.deploy_flawed(number, flawed, champion)
                demo.heading("7. stopping", "the gateway and its engines")
        finally:
            demo.settings = get_settings()
            code = demo.summary()
    return code
