"""The README and the manual (docs/) stay true: every link of the README reaches a page and a heading of it (the
manual's own links are checked by `mkdocs build --strict` in .ci/run), and every `python train.py ...` command they
show composes into a config that passes the typed boundary (Hydra's keys included), each value of a grid sweep too.

Bug caught: a page that still shows a command of a removed syntax (`-cd sweeps` with a rewrite, a group renamed, a
key moved), which a reader would copy and see fail.
"""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from clipqa.config import validate
from tests.helpers.runs import CONF, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Words that mark a command as a pattern, not one to copy: `python train.py -m sweep=NAME [overrides]`.
PLACEHOLDERS = ("NAME", "...", "[overrides]", "PATH", "DIR", "<", "URI")


def shell_blocks(text: str) -> list[str]:
    """The lines of the page's ```bash / ``` code blocks, `\\` continuations joined."""
    lines = []
    for block in re.findall(r"^```(?:bash|sh|shell)?\n(.*?)^```", text, re.S | re.M):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def train_commands() -> list[tuple[str, str]]:
    """(page, command) for every complete `python train.py ...` line of the README and the manual."""
    found = []
    for page in PAGES:
        for line in shell_blocks(page.read_text()):
            line = line.strip()
            if line.startswith("python train.py") and not any(p in line for p in PLACEHOLDERS):
                found.append((page.relative_to(ROOT).as_posix(), line))
    return sorted(set(found))


COMMANDS = train_commands()


def test_the_pages_show_the_main_commands():
    shown = {c for _, c in COMMANDS}
    assert any(c.startswith("python train.py experiment=demo") for c in shown), "the demo command is gone"
    assert any("sweep=paper" in c for c in shown), "no page shows the paper sweep"


def as_overrides(command: str) -> list[str]:
    """`python train.py -m a=1 b=2,3  # comment` -> ["a=1", "b=2"] (a grid sweep at its first value)."""
    args = shlex.split(command.replace("$PWD", "/data-folder"), comments=True)[2:]
    if "--cfg" in args:
        i = args.index("--cfg")
        del args[i : i + 2]
    args = [a for a in args if a not in ("-m", "--multirun")]
    assert not any(a.startswith("-") for a in args), f"{command}: flags this test does not know: {args}"
    overrides = []
    for o in OverridesParser.create().parse_overrides(args):
        if o.is_sweep_override():  # a grid: each of its values is a job; the first one stands for them
            value = next(iter(o.sweep_string_iterator()))
            overrides.append(f"{o.get_key_element()}={value}")
        else:
            overrides.append(o.input_line)
    return overrides


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}: {c[16:60]}" for p, c in COMMANDS])
def test_every_command_a_page_shows_composes_and_validates(page, command):
    overrides = as_overrides(command)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    job = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"})
    validate(job)


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("target", sorted(set(LINK.findall((ROOT / "README.md").read_text()))))
def test_every_link_of_the_readme_reaches_its_page_and_heading(target):
    if re.match(r"^[a-z]+://", target):
        return  # an address on the web: not checked offline
    path, _, anchor = target.partition("#")
    page = (ROOT / path) if path else ROOT / "README.md"
    assert page.exists(), f"README.md links to {target}, which does not exist"
    if anchor and page.suffix == ".md":
        headings = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
        assert anchor in slugs, f"README.md links to {target}: {path or 'README.md'} has no heading #{anchor}"


def test_a_page_is_a_file_under_docs_for_every_readme_link_into_the_manual():
    """The README's links into the manual go to pages the site builds (listed in mkdocs.yml's nav)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for target in LINK.findall((ROOT / "README.md").read_text()):
        path = target.partition("#")[0]
        if path.startswith("docs/"):
            assert Path(path).name in nav, f"{path} is linked from the README but not in mkdocs.yml's nav"
