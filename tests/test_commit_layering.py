"""The commit path's modules form no import cycle, not even through a lazy import
(issue 11 items 1-2): storage never reaches the catalog, preemption never reaches the
manager, and every name safepoint reserves in a root is defined once, in
``safepoint.ondisk.names``."""

from __future__ import annotations

import pytest

from safepoint.ondisk import manifest, names
from safepoint.storage import commit, leftovers

grimp = pytest.importorskip("grimp")


@pytest.fixture(scope="module")
def graph():  # type: ignore[no-untyped-def]
    return grimp.build_graph("safepoint", include_external_packages=False)


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("safepoint.storage.local", "safepoint.catalog.singlefile"),
        ("safepoint.storage.leftovers", "safepoint.catalog.singlefile"),
        ("safepoint.storage.commit", "safepoint.catalog.singlefile"),
        ("safepoint.preemption", "safepoint.manager"),
        ("safepoint.catalog.singlefile", "safepoint.manager"),
        ("safepoint.catalog.series", "safepoint.manager"),
    ],
)
def test_no_chain_leads_back_up(graph, importer: str, imported: str) -> None:  # type: ignore[no-untyped-def]
    assert not graph.chain_exists(importer=importer, imported=imported), graph.find_shortest_chain(
        importer=importer, imported=imported
    )


def test_the_manager_and_the_commit_path_are_in_no_cycle(graph) -> None:  # type: ignore[no-untyped-def]
    mine = [
        "safepoint.manager",
        "safepoint.preemption",
        "safepoint.callback",
        "safepoint.manager.file_saving",
        "safepoint.manager.staged_file",
        "safepoint.catalog.singlefile",
        "safepoint.catalog.series",
        "safepoint.catalog.directory",
        "safepoint.storage.commit",
        "safepoint.storage.leftovers",
        "safepoint.storage.runlog",
    ]
    for module in mine:
        for imported in graph.find_modules_directly_imported_by(module):
            assert not graph.chain_exists(importer=imported, imported=module), (module, imported)


@pytest.mark.parametrize(
    "adapter",
    [
        "safepoint.keras.model_checkpoint",
        "safepoint.keras.backup_and_restore",
        "safepoint.keras.series",
    ],
)
def test_keras_commits_through_the_manager_api_only(graph, adapter: str) -> None:  # type: ignore[no-untyped-def]
    for internal in (
        "safepoint.catalog.singlefile",
        "safepoint.storage.commit",
        "safepoint.storage.runlog",
    ):
        assert not graph.direct_import_exists(importer=adapter, imported=internal), internal


def test_reserved_names_have_one_definition() -> None:
    assert leftovers.MANIFEST_NAME is names.MANIFEST_NAME
    assert manifest.NAME == names.MANIFEST_NAME
    assert leftovers.ENTRY is names.TRASH_ENTRY
    assert commit.FILE_STEM is names.STAGED_FILE_STEM
    assert not hasattr(leftovers, "_OLD_SINGLE") and not hasattr(leftovers, "_PAYLOAD")
