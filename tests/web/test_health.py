"""GET /healthz: 200 when MongoDB and Redis answer, 503 naming what is down (the why goes to the log)."""

from __future__ import annotations

import logging

from web import create_app


def test_healthy_when_mongo_and_redis_answer(client):
    response = client.get("/healthz")

    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_json() == {"status": "ok", "down": [], "mongo": "ok", "redis": "ok"}
    assert response.cache_control.no_store


def test_503_names_redis_when_it_is_down(mongo_db, dead_port):
    app = create_app({"MONGO_DATABASE": mongo_db, "REDIS_URL": f"redis://127.0.0.1:{dead_port}/0"})

    response = app.test_client().get("/healthz")

    assert response.status_code == 503
    health = response.get_json()
    assert health["status"] == "down" and health["down"] == ["redis"]
    assert health == {"status": "down", "down": ["redis"], "mongo": "ok", "redis": "down"}


def test_503_names_mongo_when_it_is_unreachable(redis_url, dead_port):
    app = create_app(
        {
            "MONGO_URI": f"mongodb://127.0.0.1:{dead_port}/image_crawler",
            "REDIS_URL": redis_url,
            "SERVICE_TIMEOUT": 0.3,
        }
    )

    response = app.test_client().get("/healthz")

    assert response.status_code == 503
    health = response.get_json()
    assert health == {"status": "down", "down": ["mongo"], "mongo": "down", "redis": "ok"}


def test_503_names_both_when_both_are_down(dead_port):
    app = create_app(
        {
            "MONGO_URI": f"mongodb://127.0.0.1:{dead_port}/image_crawler",
            "REDIS_URL": f"redis://127.0.0.1:{dead_port}/0",
            "SERVICE_TIMEOUT": 0.3,
        }
    )

    response = app.test_client().get("/healthz")

    assert response.status_code == 503 and response.get_json()["down"] == ["mongo", "redis"]


def test_the_answer_names_no_host_port_or_error_and_the_log_says_why(app_with_stores_down, dead_port, caplog):
    app = app_with_stores_down
    with caplog.at_level(logging.WARNING):
        response = app.test_client().get("/healthz")

    assert response.status_code == 503
    assert response.get_json() == {
        "status": "down",
        "down": ["mongo", "redis"],
        "mongo": "down",
        "redis": "down",
    }
    for internal in ("127.0.0.1", str(dead_port), "Error", "refused", "secret"):
        assert internal not in response.text, internal
    logged = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("mongo" in line and "ServerSelectionTimeoutError" in line for line in logged), logged
    assert any("redis" in line and "ConnectionError" in line for line in logged), logged
    assert "secret" not in caplog.text
