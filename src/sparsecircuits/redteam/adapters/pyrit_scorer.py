"""PyRIT scorer ``CircuitTelemetryScorer``: a true/false scorer whose verdict is our circuit
telemetry of a response's text: True when a monitored policy rule fired on it.

PyRIT 1.1.0 installs beside our pins without changing any of them (the ``[pyrit]`` extra:
``pip install -c constraints.txt 'sparsecircuits[pyrit]'``), so the scorer lives in our package
and scores through the one scoring path, :mod:`sparsecircuits.redteam.telemetry`:

- no ``url``: :class:`~sparsecircuits.redteam.telemetry.InProcess`, the server's monitor run
  here on the text (model, catalogue, baseline and policy loaded once, when the scorer is made);
- ``url``: :class:`~sparsecircuits.redteam.telemetry.OverHttp`, a running ``sparsecircuits
  serve`` (its record then also covers the one token it generates).

PyRIT's scorer API changes between minor releases; this follows 1.1.0: a
``MessageTrueFalseScorer`` that reads text pieces (``_score_piece_async``). PyRIT persists every
score in its central memory, so initialise it first::

    from pyrit.setup import IN_MEMORY, initialize_pyrit_async
    await initialize_pyrit_async(memory_db_type=IN_MEMORY, load_defaults=False)
    scorer = CircuitTelemetryScorer(family="string-literal")
    [score] = await scorer.score_text_async('name = "hello"; os.system("rm -rf /") #"')
    score.get_value(), score.score_metadata["circuit_max_z"]  # True, 11.69

``score_metadata`` (PyRIT allows only str, int and float values): ``circuit_flagged`` 1 or 0,
``circuit_max_z`` (robust z, dimensionless; absent when no token was scored),
``circuit_max_z.<family>`` per family, ``circuit_rules_fired`` (JSON: rule -> token positions,
-1 for the prompt), ``circuit_action`` (the server's decision) and ``circuit_family`` (the family
scored, ``*`` for all). The class is built on first use, so this module imports without PyRIT.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from sparsecircuits.errors import InputError
from sparsecircuits.redteam.telemetry import InProcess, OverHttp, Telemetry, verdict

PYRIT_VERSION = "1.1.0"  # the API followed here; pyproject.toml's [pyrit] extra pins it
CATEGORY = "circuit-telemetry"  # the score category unless the caller names others


def family_max_z(record: dict[str, Any]) -> dict[str, float | None]:
    """Each monitored family's largest z in a telemetry record (None: no token scored)."""
    return {name: fam.get("max_z") for name, fam in (record.get("families") or {}).items()}


def score_fields(record: dict[str, Any], family: str | None = None) -> dict[str, Any]:
    """What a PyRIT score holds for a telemetry ``record``: ``value`` ("true"/"false"),
    ``description``, one-line ``rationale`` and flat ``metadata`` (see the module docstring).
    An unknown ``family`` raises a one-line InputError naming it."""
    v = verdict(record, family=family)
    meta: dict[str, str | int | float] = {
        "circuit_flagged": int(v.score == 1.0),
        "circuit_rules_fired": json.dumps(v.fired, sort_keys=True),
        "circuit_action": v.action,
        "circuit_family": family or "*",
    }
    if v.max_z is not None:  # PyRIT's metadata has no null: absent means no token was scored
        meta["circuit_max_z"] = v.max_z
    for name, z in family_max_z(record).items():
        if z is not None:
            meta[f"circuit_max_z.{name}"] = z
    fired = "; ".join(f"{rule} at tokens {pos}" for rule, pos in sorted(v.fired.items()))
    z_text = "none scored" if v.max_z is None else f"{v.max_z:.2f}"
    flagged = v.score == 1.0
    return {
        "value": "true" if flagged else "false",
        "description": ("a" if flagged else "no") + " monitored circuit rule fired",
        "rationale": f"rules fired: {fired or 'none'}; max z {z_text}; action {v.action}",
        "metadata": meta,
    }


def make_telemetry(model: str | Path = "stdlib-sparse", *, url: str | None = None,
                   user_key: str | None = None, operator_key: str | None = None,
                   catalog: Path | None = None, policy: Path | None = None,
                   family: str | None = None) -> Telemetry:  # fmt: skip
    """The backend: in-process without ``url``, else the server at ``url``. An in-process
    backend refuses a ``family`` its catalogue does not monitor at once (one line)."""
    if url is not None:
        return OverHttp(url, user_key=user_key, operator_key=operator_key)
    backend = InProcess(model, catalog=catalog, policy=policy)
    known = backend.describe().get("families") or []
    if family is not None and family not in known:
        raise InputError(
            f"family {family!r}: not monitored here (monitored: {', '.join(sorted(known))})"
        )
    return backend


def _build_class() -> type:
    try:
        from pyrit.models import ComponentIdentifier, MessagePiece, Score
        from pyrit.score import ScorerPromptValidator
        from pyrit.score.true_false.true_false_scorer import MessageTrueFalseScorer
    except ImportError as err:
        raise ImportError(
            f"the PyRIT scorer needs PyRIT {PYRIT_VERSION} "
            f"(pip install 'sparsecircuits[pyrit]'): {err}"
        ) from None
    from importlib.metadata import version

    # PyRIT's scorer API moves between releases (1.1.0 already deprecates message-shaped
    # scoring, to go in 2.0.0): another version would fail later and obscurely; refuse it now.
    if (found := version("pyrit")) != PYRIT_VERSION:
        raise ImportError(
            f"pyrit {found} is installed; the PyRIT scorer follows {PYRIT_VERSION} "
            f"(pip install -c constraints.txt 'sparsecircuits[pyrit]')"
        )

    class CircuitTelemetryScorer(MessageTrueFalseScorer):
        """True when a monitored circuit rule fires on a response's text (PyRIT 1.1.0)."""

        _DEFAULT_VALIDATOR = ScorerPromptValidator(supported_data_types=["text"])

        def __init__(self, *, model: str | Path = "stdlib-sparse", url: str | None = None,
                     user_key: str | None = None, operator_key: str | None = None,
                     family: str | None = None, catalog: Path | None = None,
                     policy: Path | None = None, telemetry: Telemetry | None = None,
                     categories: list[str] | None = None,
                     validator: ScorerPromptValidator | None = None) -> None:  # fmt: skip
            """``family``: score one circuit family (None: any monitored one); ``telemetry``:
            an existing backend (else one from ``model``/``url``, see :func:`make_telemetry`);
            ``user_key``/``operator_key``: the server's API keys."""
            self._family = family
            self._telemetry = telemetry or make_telemetry(
                model, url=url, user_key=user_key, operator_key=operator_key,
                catalog=catalog, policy=policy, family=family,
            )  # fmt: skip
            self._categories = list(categories) if categories else [CATEGORY]
            # One text at a time: the in-process model is shared; PyRIT may score pieces
            # concurrently, and the work runs off the event loop so other tasks go on.
            self._lock = threading.Lock()
            super().__init__(validator=validator or self._DEFAULT_VALIDATOR)

        def _build_identifier(self) -> ComponentIdentifier:
            backend = self._telemetry.describe()
            params = {"family": self._family or "*", "backend": backend.get("backend", "?"),
                      "source": str(backend.get("model") or backend.get("url") or "?"),
                      "policy_sha256": str(backend.get("policy_sha256") or "")}  # fmt: skip
            return self._create_identifier(params=params)

        def _record(self, text: str) -> dict[str, Any]:
            with self._lock:
                return self._telemetry.record(text)

        async def _score_piece_async(
            self, message_piece: MessagePiece, *, objective: str | None = None
        ) -> list[Score]:
            text = message_piece.converted_value
            if not text:  # nothing to look at: no verdict, rather than a clean "false"
                return [self._build_undetermined_score(
                    rationale="empty text: no tokens to score", message_piece_id=message_piece.id,
                    objective=objective, score_category=self._categories)]  # fmt: skip
            record = await asyncio.to_thread(self._record, text)
            f = score_fields(record, self._family)
            return [Score(score_value=f["value"], score_value_description=f["description"],
                          score_type="true_false", score_category=self._categories,
                          score_rationale=f["rationale"], score_metadata=f["metadata"],
                          scorer_class_identifier=self.get_identifier(),
                          message_piece_id=message_piece.id, objective=objective)]  # fmt: skip

    CircuitTelemetryScorer.__module__ = __name__  # as if defined at module level
    CircuitTelemetryScorer.__qualname__ = "CircuitTelemetryScorer"
    return CircuitTelemetryScorer


_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    """``CircuitTelemetryScorer`` is built on first access (PyRIT imported then)."""
    global _CLASS
    if name != "CircuitTelemetryScorer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS
