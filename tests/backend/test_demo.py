"""The README's CPU path: `python -m sglang_mage.demo` runs MAGE through the references."""

from sglang_mage import demo


def test_demo_step_table(capsys):
    demo.main(["--prefix", "1024", "--block", "8", "--steps", "3", "--k", "64"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    mass, recall, err = (float(x) for x in rows[0][1:])
    # Step 1 selects from its own scores: its top-k is kept whole, and most of the mass with it.
    assert recall == 1.0 and 0.5 < mass <= 1.0 and err < 1.0
