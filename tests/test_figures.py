"""The summary rows' figure formatting: a verdict is only as strong as its interval."""

from agent_forge.figures import ci_text, met_within, pct


def test_pct_and_interval_text():
    assert pct(0.525) == "52.5%" and pct(None) == "-" and pct(None, missing="n/a") == "n/a"
    assert ci_text([0.417, 0.631]) == " [41.7, 63.1]" and ci_text(None) == "" and ci_text([]) == ""


def test_a_verdict_says_when_its_interval_holds_the_target():
    # 91 of 100 against 90%: the point estimate meets it, the interval [83.8, 95.2] does not settle it
    assert met_within(True, [0.838, 0.952], 0.90) == "met by the point estimate; its 95% interval spans 90%"
    assert met_within(False, [0.767, 0.907], 0.90) == "MISSED by the point estimate; its 95% interval spans 90%"
    # an interval wholly on one side settles it; so does one whose low end is the target itself
    assert met_within(True, [0.92, 0.97], 0.90) == "met"
    assert met_within(False, [0.755, 0.945], 0.10) == "MISSED"
    assert met_within(True, [0.90, 0.95], 0.90) == "met"
    assert met_within(True, None, 0.90) == "met"
    assert met_within(True, [0.28, 0.35], 0.3, shown="0.3").endswith("its 95% interval spans 0.3")
