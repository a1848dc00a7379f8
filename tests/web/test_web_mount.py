"""The console's public front and how it mounts into the control plane."""

from __future__ import annotations

from pathlib import Path

import edgewise.web
from edgewise.control import Settings, create_app, open_store
from edgewise.web import mount_console

from .conftest import route_exists


def test_public_names_are_sorted_and_few() -> None:
    assert edgewise.web.__all__ == sorted(edgewise.web.__all__) == ["mount_console"]


def test_control_plane_serves_the_console_and_mounting_again_is_a_no_op(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    store = open_store(settings.database_url)
    try:
        app = create_app(settings, store, background=False)
        assert route_exists(app, "/login")  # create_app mounts the console itself
        routes = len(app.routes)
        mount_console(app)
        assert len(app.routes) == routes
        assert route_exists(app, "/login") and route_exists(app, "/static/console.js")
    finally:
        store.close()
