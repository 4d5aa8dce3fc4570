"""Λ-Split threat model: capture the real traffic, look for leaks, attack what leaks.

Submodules (import the one you need; only :mod:`threat_model.attacks` and
:mod:`threat_model.eavesdrop` import torch / lambda_split):

* :mod:`threat_model.capture` — loopback packet capture (AF_PACKET or relay), reassembly, pcap.
* :mod:`threat_model.detectors` — text, token-id, hidden-state and pixel leak detectors.
* :mod:`threat_model.traffic` — message sizes, counts and timing; length-inference tests.
* :mod:`threat_model.attacks` — tail replay, SipIt prompt inversion, cheap probes.
* :mod:`threat_model.eavesdrop` — decode plaintext tensor frames from captured streams.
* :mod:`threat_model.baselines` — a deliberately leaky cloud-only completion API.
* :mod:`threat_model.sweep` — attack recovery and cost vs split depth and wire encoding.
* :mod:`threat_model.suite` — ``lambda-split eavesdrop``: every mode against a live server,
  with policy, positive controls and the sweep; :mod:`threat_model.report` renders it.
* :mod:`threat_model.frontier` — ``lambda-split frontier``: uplink defences against attacks adapted
  to them, and what each costs the output.
* :mod:`threat_model.cheats` — dishonest trunk executors (skipped layer, int4, perturbed weights,
  noisy or replayed answers), for the tests and the benchmark of receipts and audits only.
"""

from __future__ import annotations

__all__ = [
    "attacks",
    "baselines",
    "capture",
    "cheats",
    "detectors",
    "eavesdrop",
    "frontier",
    "report",
    "suite",
    "sweep",
    "traffic",
]
