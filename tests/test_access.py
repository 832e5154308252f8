"""Who may see what (services/access.py, app.py): sign-in when served to a network, share links for anyone.

AppTest drives the real app; the pages read a real data folder with one finished digits-cnn run
(test_pages.py's fixtures)."""
from __future__ import annotations

import datetime as dt
import secrets

import pytest

from services import access, api
from services.errors import UserError
from test_pages import open_page, texts, ui_home, ui_run_home, ui_run_template  # noqa: F401 - fixtures

PASSWORD = "correct horse battery"
PAGES = ["app_pages/models.py", "app_pages/compress.py", "app_pages/data.py", "app_pages/jobs.py",
         "app_pages/compare.py", "app_pages/search.py", "app_pages/result.py"]


def test_passwords_are_stored_as_salted_scrypt_hashes():
    stored = access.hash_password(PASSWORD)
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    assert access.hash_password(PASSWORD) != stored  # a fresh salt each time
    assert access.password_matches(PASSWORD, stored)
    assert not access.password_matches("wrong password", stored)
    assert not access.password_matches(PASSWORD, None) and not access.password_matches(PASSWORD, "md5$x$y")
    with pytest.raises(UserError, match="at least 8"):
        access.hash_password("short")


def test_sign_in_is_required_only_when_served_beyond_this_machine(monkeypatch):
    monkeypatch.delenv("EXPLORER_SIGN_IN", raising=False)
    monkeypatch.delenv("EXPLORER_ADDRESS", raising=False)
    assert not access.sign_in_required()  # make run: 127.0.0.1
    monkeypatch.setenv("EXPLORER_ADDRESS", "0.0.0.0")
    assert access.sign_in_required()
    monkeypatch.setenv("EXPLORER_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("EXPLORER_SIGN_IN", "required")
    assert access.sign_in_required()


def test_a_share_link_opens_until_revoked_or_expired_and_a_guess_finds_nothing(ui_run_home):
    home, run = ui_run_home
    db = api.connect(home)
    share = access.create_share(db, "run", {"run": run["id"]})
    assert len(share["id"]) == 32 and share["path"] == f"/share?id={share['id']}"
    assert access.open_share(db, share["id"])["target"] == {"run": run["id"]}
    access.revoke_share(db, share["id"])
    with pytest.raises(UserError, match="withdrawn"):
        access.open_share(db, share["id"])
    old = access.create_share(db, "run", {"run": run["id"]}, days=1)
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).isoformat()
    db.execute("UPDATE shares SET expires_at = ? WHERE id = ?", [past, old["id"]])
    with pytest.raises(UserError, match="expired"):
        access.open_share(db, old["id"])
    with pytest.raises(UserError, match="No share has this link"):
        access.open_share(db, secrets.token_hex(16))  # a guessed 128-bit id
    assert [s["id"] for s in access.shares_of(db, "run", "run", run["id"])] == [old["id"], share["id"]]


@pytest.fixture
def signed_off(ui_run_home, monkeypatch):
    monkeypatch.setenv("EXPLORER_SIGN_IN", "required")
    monkeypatch.setenv("EXPLORER_PASSWORD_HASH", access.hash_password(PASSWORD))
    return ui_run_home


@pytest.mark.parametrize("page", PAGES)
def test_with_sign_in_on_every_page_shows_the_sign_in_and_no_data(signed_off, page):
    _, run = signed_off
    at = open_page(page, id=run["id"])
    assert texts(at.title) == ["Compression Explorer"]
    assert [i.label for i in at.text_input] == ["Team password"]
    assert not at.get("dataframe") and not at.get("metric") and not at.get("vega_lite_chart")
    assert not any(run["id"] in text for text in texts(at.markdown) + texts(at.caption) + texts(at.code))


def test_the_right_password_opens_the_dashboard_and_a_wrong_one_does_not(signed_off):
    at = open_page("app_pages/compare.py")
    at.text_input[0].set_value("not the password")
    at.button[0].click().run()
    assert "That password is not right." in texts(at.error) and not at.get("dataframe")
    at.text_input[0].set_value(PASSWORD)
    at.button[0].click().run()
    assert not at.exception and texts(at.title)[0] != "Compression Explorer"  # the default page, with data


def test_a_share_link_shows_its_run_read_only_without_signing_in(signed_off):
    home, run = signed_off
    db = api.connect(home)
    share = access.create_share(db, "run", {"run": run["id"]})
    at = open_page("app_pages/share.py", id=share["id"])
    assert texts(at.title) == ["Digits CNN: prune.magnitude (amount 0.6) → quantize.dynamic"]
    assert texts(at.subheader) == [api.summary_sentence(run["metrics"], run["baseline"])]
    assert not at.button and not at.text_input and not at.get("page_link")  # nothing to do, nowhere to go
    access.revoke_share(db, share["id"])
    at = open_page("app_pages/share.py", id=share["id"])
    assert texts(at.error) == ["This link was withdrawn by the person who shared it."]
    assert not at.get("table") and not at.subheader
    at = open_page("app_pages/share.py", id=secrets.token_hex(16))
    assert texts(at.error) == ["No share has this link. Check that the whole link was copied."]


def test_a_shared_comparison_and_search_show_only_their_runs(signed_off):
    home, run = signed_off
    db = api.connect(home)
    share = access.create_share(db, "comparison", {"model": "digits-cnn", "task": "digits", "runs": [run["id"]]})
    at = open_page("app_pages/share.py", id=share["id"])
    frame = at.dataframe[0].value
    assert len(frame) == 2 and "link" not in frame.columns  # no way on to the result pages
    assert texts(at.title) == ["Digits CNN: 1 run side by side"]

    found = api.start_search(db, "digits-cnn", {}, "prune.structured.amount", 1.0, 3)
    share = access.create_share(db, "search", {"search": found["id"]})
    at = open_page("app_pages/share.py", id=share["id"])
    assert texts(at.title) == ["Digits CNN: a compression search"] and len(at.dataframe[0].value) == 1
    assert not at.button and not at.get("page_link")


OIDC = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "a-long-random-cookie-secret-0123",
        "client_id": "explorer", "client_secret": "not-a-real-secret",
        "server_metadata_url": "https://accounts.example.com/.well-known/openid-configuration"}


@pytest.mark.parametrize("page", ["app_pages/compare.py", "app_pages/result.py"])
def test_with_an_openid_provider_the_sign_in_is_its_button_and_no_password_or_data(signed_off, page):
    """[auth] in secrets.toml: Streamlit's st.login is the way in (the provider is not reached here: no
    network), and the team password form is not offered even when its hash is set."""
    from streamlit.testing.v1 import AppTest

    from test_pages import APP

    _, run = signed_off
    at = AppTest.from_file(APP, default_timeout=30)
    at.secrets["auth"] = OIDC
    at.query_params["id"] = run["id"]
    at.switch_page(page)
    at.run()
    assert not at.exception
    assert texts(at.title) == ["Compression Explorer"] and [b.label for b in at.button] == ["Sign in"]
    assert not at.text_input  # no password form
    assert not at.get("dataframe") and not at.get("metric") and not at.get("vega_lite_chart")
    assert not any(run["id"] in text for text in texts(at.markdown) + texts(at.caption) + texts(at.code))
