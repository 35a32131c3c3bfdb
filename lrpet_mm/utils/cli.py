"""Shared pieces of the ``tools/`` command lines (mmdet / mmseg ``tools/`` conventions)."""
import argparse
import sys
from typing import Callable, Optional, Sequence, Tuple, Type

from mmengine.config import DictAction


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose description is the module docstring's first paragraph and
    whose epilog is the rest (usage examples), layout kept."""
    paragraphs = doc.strip().split('\n\n', 1)
    return argparse.ArgumentParser(
        description=' '.join(paragraphs[0].split()),
        epilog=paragraphs[1] if len(paragraphs) > 1 else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)


def add_cfg_options(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options key=value ...`` merged into the config (mmengine ``DictAction``)."""
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, default=None,
        help='override settings of the config: key=value pairs (e.g. '
        'test_dataloader.dataset.data_root=data/VOCdevkit/), merged as mmdet/mmseg tools do; '
        'a list is written key="[a,b]" or key=a,b')


def add_input_shape(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--input-shape C H W`` (three ints; default: read from the config)."""
    parser.add_argument('--input-shape', type=int, nargs=3, default=None,
                        metavar=('C', 'H', 'W'), help=help_text)


def run_tool(main: Callable[[], int], refused: Tuple[Type[BaseException], ...] = (),
             errors: Sequence[Type[BaseException]] = (FileNotFoundError, PermissionError,
                                                       ValueError, KeyError)) -> int:
    """Run ``main``; an expected error prints ``refused: ...`` (the ``refused`` types) or
    ``error: ...`` on stderr and returns 2, with no traceback."""
    try:
        return main()
    except tuple(errors) as e:
        kind = 'refused' if isinstance(e, refused) else 'error'
        message: Optional[object] = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f'{kind}: {message}', file=sys.stderr)
        return 2
