"""The tools/ command lines follow mmdet / mmseg tools/ conventions."""
import contextlib
import io

import pytest

from helpers import load_repo_script

CONFIG_TOOLS = ('factorize', 'report', 'export_onnx')


def help_text(tool: str) -> str:
    module = load_repo_script(f'tools/{tool}.py', f'{tool}_cli_help')
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        module.parse_args(['--help'])
    assert exit_info.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize('tool', CONFIG_TOOLS + ('make_voc_data', ))
def test_help_has_a_description_and_an_example(tool):
    text = help_text(tool)
    usage, description = text.split('\n\n')[:2]
    assert usage.startswith('usage: ')
    assert len(description.split()) >= 6, description  # a sentence, not the blank docstring line
    assert 'example:' in text


@pytest.mark.parametrize('tool', CONFIG_TOOLS)
def test_config_tools_take_config_checkpoint_and_cfg_options(tool):
    text = help_text(tool)
    usage = ' '.join(text.split('\n\n')[0].split())
    assert usage.endswith('config checkpoint'), usage  # the positionals, in this order
    assert '--cfg-options' in text
    # directories are --work-dir, files are --out (never --out-dir)
    assert '--out-dir' not in text
    assert ('--work-dir' in text) != ('--out ' in text or '--out\n' in text)
