"""Who may see what: the sign-in a team's dashboard asks for, and share links anyone may open.

- Served on 127.0.0.1 (the default of `make run`), the dashboard asks nothing: only this machine
  reaches it. Served to a network (EXPLORER_ADDRESS not a loopback address), or with
  EXPLORER_SIGN_IN=required, every page asks for a sign-in first: Streamlit's own `st.login` when an
  OpenID Connect provider is configured in .streamlit/secrets.toml ([auth]), else a team password
  whose scrypt hash is in EXPLORER_PASSWORD_HASH (`python -m services hash-password` makes one).
- A share link (/share?id=…, a 128-bit random id) shows one result, comparison or search read-only,
  signed in or not, until it is revoked or expires. Torch-free.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets

from services.errors import UserError
from storage import queue as q

LOOPBACK = ("127.0.0.1", "localhost", "::1", "")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
SHARE_KINDS = ("run", "search", "comparison")


def sign_in_required() -> bool:
    if os.environ.get("EXPLORER_SIGN_IN") == "required":
        return True
    return os.environ.get("EXPLORER_ADDRESS", "127.0.0.1") not in LOOPBACK


def hash_password(password: str) -> str:
    """'scrypt$<salt hex>$<hash hex>' (n=2^14, r=8, p=1): what EXPLORER_PASSWORD_HASH holds."""
    if len(password) < 8:
        raise UserError("Choose a password of at least 8 characters.")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str | None) -> bool:
    try:
        scheme, salt, expected = (stored or "").split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), **SCRYPT)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), expected)


# ---- share links -------------------------------------------------------------------------------

def create_share(db, kind: str, target: dict, days: float | None = None) -> dict:
    """A new link to one run ({'run': id}), search ({'search': id}) or comparison ({'model', 'task',
    'runs': [ids]}); `days` makes it expire."""
    if kind not in SHARE_KINDS:
        raise UserError(f"A share link shows a {', a '.join(SHARE_KINDS)}; got {kind!r}.")
    if days is not None and not 0 < float(days) <= 3650:
        raise UserError(f"A link expires after 0 to 3,650 days; got {days!r}.")
    expires = None if days is None else (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=float(days))).isoformat()
    share_id = q.new_id()
    db.execute("INSERT INTO shares (id, kind, target, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
               [share_id, kind, json.dumps(target), q.utcnow(), expires])
    return get_share(db, share_id)


def get_share(db, share_id: str) -> dict:
    """The share, whatever its state (for its owner's list)."""
    rows = list(db.query("SELECT * FROM shares WHERE id = ?", [share_id]))
    if not rows:
        raise UserError("No share has this link. Check that the whole link was copied.")
    row = dict(rows[0])
    row["target"] = json.loads(row["target"])
    row["path"] = f"/share?id={share_id}"
    return row


def open_share(db, share_id: str) -> dict:
    """The share a visitor may see, or a UserError saying why not (unknown, withdrawn, expired)."""
    share = get_share(db, share_id)
    if share["revoked_at"]:
        raise UserError("This link was withdrawn by the person who shared it.")
    if share["expires_at"] and dt.datetime.fromisoformat(share["expires_at"]) < dt.datetime.now(dt.timezone.utc):
        raise UserError("This link has expired.")
    return share


def revoke_share(db, share_id: str) -> dict:
    get_share(db, share_id)
    db.execute("UPDATE shares SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", [q.utcnow(), share_id])
    return get_share(db, share_id)


def shares_of(db, kind: str, key: str, value: str) -> list[dict]:
    """The shares of one run or search (newest first)."""
    rows = db.query("SELECT id FROM shares WHERE kind = ? AND json_extract(target, ?) = ? ORDER BY created_at DESC",
                    [kind, f"$.{key}", value])
    return [get_share(db, row["id"]) for row in rows]
