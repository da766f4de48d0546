"""``rollbackd validate`` sizes the label buffer: where ``max_pending_labels`` binds for the
``join_horizon``, and, with ``--label-rate``, whether a stated rate of unlabelled predictions
fits. The numbers are the written-out formulas: binds above cap / horizon predictions/s in all;
a rate r per deployment over n deployments needs r · n · horizon entries, and when that exceeds
the cap only the newest cap / (r · n) seconds keep their outcome."""

from __future__ import annotations

from click.testing import CliRunner

from rollbackd.cli import main
from rollbackd.rules.loader import load_config_text, summarize
from rollbackd.rules.loading.summary import JOIN_ENTRY_BYTES, label_buffer

RULES = """
version: 1
settings: {join_horizon: 24h, max_pending_labels: 2000000}
deployments:
  fraud: {backend: {type: log}}
  churn: {backend: {type: log}}
  search: {backend: {type: log}}
rules:
  - name: model-error
    detector: model_error
    deployments: [fraud, churn]
    threshold: 0.2
    window: {size: 5m}
    actions: [notify]
  - name: errors
    detector: error_rate
    threshold: 0.05
    window: {size: 1m}
    actions: [notify]
"""


def test_the_summary_says_where_the_cap_binds():
    config = load_config_text(RULES)
    buffer = label_buffer(config)
    assert (buffer.declared, buffer.undeclared) == (2, False)  # search has no label rule
    assert buffer.binds_at == 2_000_000 / 86_400
    line = buffer.line()
    assert line in summarize(config).splitlines()
    assert "label rules on 2 declared deployment(s)" in line
    assert f"about {2_000_000 * JOIN_ENTRY_BYTES / 1e6:,.0f} MB when full" in line
    assert "binds above 23.1481 unlabelled predictions/s in all (11.5741 per deployment)" in line


def test_no_label_rule_no_buffer():
    config = load_config_text(RULES.replace("detector: model_error", "detector: latency"))
    assert label_buffer(config) is None
    assert not any(line.startswith("label buffer") for line in summarize(config).splitlines())


def test_a_stated_rate_that_does_not_fit_warns_and_says_what_is_kept(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    done = CliRunner().invoke(main, ["validate", str(path), "--label-rate", "20"])
    assert done.exit_code == 0, done.output
    needed = 20 * 2 * 86_400  # 3,456,000 > 2,000,000
    kept = 2_000_000 / (20 * 2)  # 50,000 s = 13h53m20s
    assert kept == 13 * 3600 + 53 * 60 + 20
    assert (f"warning: settings.max_pending_labels: at 20 unlabelled predictions/s per deployment the label "
            f"buffer needs {needed:,} entries (about {needed * JOIN_ENTRY_BYTES / 1e6:,.0f} MB) but "
            "max_pending_labels is 2,000,000: predictions older than 13h53m20s lose their outcome") in done.output
    fits = CliRunner().invoke(main, ["validate", str(path), "--label-rate", "5"])
    assert fits.exit_code == 0 and f"label buffer at 5/s per deployment: {5 * 2 * 86_400:,} of 2,000,000 entries" in fits.output
    assert "max_pending_labels:" not in fits.output
    refused = CliRunner().invoke(main, ["validate", str(path), "--label-rate", "0"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
