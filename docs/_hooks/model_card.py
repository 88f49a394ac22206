"""MkDocs hook: the model card is a page of the site as well as a file that ships with the model.

`resources/models/MODEL_CARD.md` travels in the plugin ZIP beside the weights, so it stays there and its links
are written relative to the repository (`../../docs/...`).  This hook adds it to the site as `model-card.md`
and turns repository-relative links into site links, in both directions, so that one file serves both and
`mkdocs build --strict` still checks every link.
"""
from pathlib import Path

from mkdocs.structure.files import File

CARD = Path(__file__).resolve().parents[2] / "resources" / "models" / "MODEL_CARD.md"
CARD_PAGE = "model-card.md"


def on_files(files, config):
    files.append(File.generated(config, CARD_PAGE, abs_src_path=str(CARD)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == CARD_PAGE:  # the card sits at the site's root: ../../docs/X -> X
        return markdown.replace("](../../docs/", "](")
    # docs/**/X.md -> ../(...)resources/models/MODEL_CARD.md: the same depth, minus one, reaches model-card.md
    return markdown.replace("../resources/models/MODEL_CARD.md", CARD_PAGE)
