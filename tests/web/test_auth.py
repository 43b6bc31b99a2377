"""HTTP basic auth: with WEB_USER and WEB_PASSWORD set, every route but /healthz asks for them."""

from __future__ import annotations

import base64

import pytest

from image_crawler import storage
from image_crawler.config import get_settings
from web import create_app

USER, PASSWORD = "crawler", "correct horse battery staple"


def basic(user: str, password: str) -> dict[str, str]:
    """The ``Authorization`` header a browser sends for ``user`` and ``password``."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def guarded(mongo_db, redis_url):
    """An app that asks for :data:`USER` and :data:`PASSWORD`."""
    storage.ensure_indexes(mongo_db)
    return create_app(
        {"MONGO_DATABASE": mongo_db, "REDIS_URL": redis_url, "WEB_USER": USER, "WEB_PASSWORD": PASSWORD}
    )


@pytest.fixture
def stored(seed) -> str:
    """One stored image and a few outcomes, one of them an error; gives the image's MD5."""
    md5 = seed.image(7, url="http://private.test/holiday.png")
    seed.outcome("success", url="http://private.test/holiday.png")
    seed.outcome("error", url="http://private.test/secret-plan.png", reason="http 404")
    return md5


def routes(md5: str) -> list[str]:
    return [
        "/",
        "/?page=2",
        "/monitoring",
        "/monitoring.json?minutes=all",
        f"/image/{md5}",
        f"/image/{md5}.json",
        "/static/style.css",
        "/static/dashboard.js",
        "/nowhere",
        "/nowhere.json",
    ]


def test_every_route_but_healthz_answers_401_without_credentials(guarded, stored):
    client = guarded.test_client()

    for path in routes(stored):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="image-crawler"'), path
        for secret in (stored, "private.test", "holiday", "secret-plan", "404", "success"):
            assert secret not in response.text, (path, secret)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert "Content-Security-Policy" in response.headers, path
    assert client.post("/monitoring.json").status_code == 401
    assert client.open("/", method="OPTIONS").status_code == 401


def test_401_answers_json_on_json_routes_and_html_elsewhere(guarded):
    client = guarded.test_client()

    json = client.get("/monitoring.json")
    html = client.get("/")

    assert json.mimetype == "application/json" and json.get_json()["status"] == 401
    assert html.mimetype == "text/html"


def test_healthz_needs_no_credentials(guarded):
    response = guarded.test_client().get("/healthz")

    assert response.status_code == 200 and response.get_json()["status"] == "ok"


def test_the_right_credentials_open_every_route(guarded, stored):
    client = guarded.test_client()

    for path in routes(stored):
        response = client.get(path, headers=basic(USER, PASSWORD))
        assert response.status_code == (404 if "nowhere" in path else 200), path
    assert "secret-plan" in client.get("/", headers=basic(USER, PASSWORD)).text


@pytest.mark.parametrize(
    "authorization",
    [
        basic(USER, "wrong")["Authorization"],
        basic("someone", PASSWORD)["Authorization"],
        basic(USER, "")["Authorization"],
        basic("", "")["Authorization"],
        basic(USER, PASSWORD[:-1])["Authorization"],
        basic(USER, PASSWORD + "!")["Authorization"],
        basic(USER.upper(), PASSWORD)["Authorization"],
        basic(PASSWORD, USER)["Authorization"],
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Basic",
        "Bearer " + PASSWORD,
        "Digest username=crawler",
        f"{USER}:{PASSWORD}",
    ],
)
def test_wrong_or_malformed_credentials_are_refused(guarded, authorization):
    response = guarded.test_client().get("/", headers={"Authorization": authorization})

    assert response.status_code == 401 and "WWW-Authenticate" in response.headers


def test_credentials_are_utf8_and_may_hold_colons(mongo_db, redis_url):
    app = create_app(
        {"MONGO_DATABASE": mongo_db, "REDIS_URL": redis_url, "WEB_USER": "zoë", "WEB_PASSWORD": "pä:ss:wörd"}
    )
    client = app.test_client()

    assert client.get("/", headers=basic("zoë", "pä:ss:wörd")).status_code == 200
    assert client.get("/", headers=basic("zoë", "pä")).status_code == 401
    assert 'charset="UTF-8"' in client.get("/").headers["WWW-Authenticate"]


def test_without_credentials_configured_the_app_is_open(client):
    assert client.get("/").status_code == 200
    assert client.get("/monitoring.json").status_code == 200


def test_the_app_reads_web_user_and_web_password_from_the_environment(monkeypatch, mongo_db, redis_url):
    monkeypatch.setenv("WEB_USER", USER)
    monkeypatch.setenv("WEB_PASSWORD", PASSWORD)
    get_settings.cache_clear()
    try:
        app = create_app({"MONGO_DATABASE": mongo_db, "REDIS_URL": redis_url})
    finally:
        get_settings.cache_clear()
    client = app.test_client()

    assert client.get("/").status_code == 401
    assert client.get("/", headers=basic(USER, PASSWORD)).status_code == 200


@pytest.mark.parametrize("config", [{"WEB_USER": USER}, {"WEB_PASSWORD": PASSWORD}])
def test_a_user_without_a_password_or_the_reverse_is_refused_at_startup(mongo_db, config):
    with pytest.raises(ValueError, match="WEB_USER and WEB_PASSWORD"):
        create_app({"MONGO_DATABASE": mongo_db, **config})


def test_a_user_name_with_a_colon_is_refused_at_startup(mongo_db):
    # Basic auth splits user and password at the first colon: such a user could never sign in.
    with pytest.raises(ValueError, match="WEB_USER"):
        create_app({"MONGO_DATABASE": mongo_db, "WEB_USER": "team:crawler", "WEB_PASSWORD": PASSWORD})


def every_route(app, md5: str) -> list[tuple[str, str, str, bool]]:
    """``(endpoint, method, path, sampled)`` for every rule of ``app.url_map`` and each of its methods.

    Arguments get sample values that exist in the ``stored`` data (``sampled``: all of them did);
    an argument no sample names gets ``1``, so a new route is still asked for, and guarded.
    """
    samples = {"filename": "style.css", "run": "seed", "name": md5}
    adapter = app.url_map.bind("localhost")
    found = []
    for rule in app.url_map.iter_rules():
        values = {name: samples.get(name, "1") for name in rule.arguments}
        path = adapter.build(rule.endpoint, values)
        assert adapter.match(path)[0] == rule.endpoint, (rule.rule, path)  # this rule's own path
        sampled = set(rule.arguments) <= set(samples)
        found += [(rule.endpoint, method, path, sampled) for method in sorted(rule.methods or ())]
    return found


def test_every_rule_of_the_url_map_but_healthz_asks_for_credentials(guarded, stored):
    client = guarded.test_client()
    routes = every_route(guarded, stored)
    assert {"static", "runs.show", "runs.failed", "images.png", "metrics.metrics"} <= {
        endpoint for endpoint, *_ in routes
    }  # the map is what is walked, static files included (web/auth.py: they are asked for too)

    open_without = set()
    for endpoint, method, path, sampled in routes:
        without = client.open(path, method=method)
        if without.status_code == 401:
            assert without.headers["WWW-Authenticate"].startswith('Basic realm="image-crawler"'), path
        else:
            open_without.add(endpoint)
        without.close()  # a streamed answer (failed.txt) holds its request context until closed
        given = client.open(path, method=method, headers=basic(USER, PASSWORD))
        given.close()
        assert given.status_code != 401, (method, path)
        if sampled and method == "GET":
            assert given.status_code == 200, (path, given.status_code)  # the samples reach the view
    assert open_without == {"health.healthz"}
