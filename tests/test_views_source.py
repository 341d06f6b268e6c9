"""Package source shown in the notebooks: names, line numbers and excerpts read from the files."""

import textwrap

import pytest

from ichpro.errors import IchproError
from ichpro.losses import sdm_loss
from ichpro.models.fusion import VRT, FusionStack
from ichpro.views.source import PACKAGE_PARENT, qualified_name, show_source


def file_lines(source):
    lines = (PACKAGE_PARENT / source.path).read_text().splitlines()
    return textwrap.dedent("\n".join(lines[source.first - 1: source.last]))


def test_a_class_is_shown_whole_with_its_name_file_and_lines():
    source = show_source(VRT)
    assert source.name == "ichpro.models.fusion.VRT" and source.path == "ichpro/models/fusion.py"
    assert source.code.startswith("class VRT(nn.Module):") and "def forward" in source.code
    assert file_lines(source) == source.code


def test_a_decorated_function_shows_its_own_lines_under_its_own_name():
    source = show_source(sdm_loss)
    assert qualified_name(sdm_loss) == source.name == "ichpro.losses.sdm_loss"
    first, second = source.code.splitlines()[:2]
    assert first == "@_float32" and second.startswith("def sdm_loss(vision: torch.Tensor,")
    assert file_lines(source) == source.code


def test_a_start_marker_alone_shows_the_whole_statement():
    source = show_source(FusionStack.__init__, start="self.tail")
    lines = source.code.splitlines()
    assert lines[0] == "self.tail = nn.Sequential(" and lines[-1] == ")" and len(lines) == 6
    assert source.name == "ichpro.models.fusion.FusionStack.__init__"
    assert file_lines(source) == source.code


def test_start_and_stop_markers_bound_the_excerpt():
    source = show_source(FusionStack.__init__, start="self.tail", stop="nn.Conv3d")
    assert source.code.splitlines()[-1].strip() == "nn.Conv3d(dim, dim, kernel_size=3, padding=1),"
    assert source.last - source.first == 2


def test_markdown_has_a_caption_and_a_python_block_and_the_plain_text_the_code():
    source = show_source(VRT.forward)
    markdown = source._repr_markdown_()
    assert markdown.startswith("`ichpro.models.fusion.VRT.forward · ichpro/models/fusion.py, lines ")
    assert f"```python\n{source.code}\n```" in markdown
    assert repr(source).endswith(source.code) and source.caption in repr(source)


def test_a_missing_marker_names_the_object_and_the_marker():
    with pytest.raises(IchproError, match="ichpro.models.fusion.VRT.*'no such line'"):
        show_source(VRT, start="no such line")
