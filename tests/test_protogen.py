"""The checked-in generated code matches proto/ (regenerate with `python -m mixer.protogen`)."""

from mixer import protogen


def test_generated_code_is_current(capsys):
    assert protogen.main(["--check"]) == 0, capsys.readouterr().err
