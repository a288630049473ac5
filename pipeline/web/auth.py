"""Users, passwords, sessions and login limits (the web database, see db.py).

- Passwords are hashed with argon2id (argon2-cffi's defaults); a hash made with weaker
  parameters is replaced at the next successful login.
- A session is a random token in an HttpOnly, SameSite=Strict cookie; the database keeps
  only its sha256, with the user, a CSRF token, the login time and the last request.  It
  ends ``web.session_idle_min`` after the last request and ``web.session_max_hours`` after
  the login, whichever comes first; changing or disabling a user's password ends them all.
- Logins are limited: ``web.login_max_failures`` failures of one user name within
  ``web.login_window_s`` refuse further attempts for that name (four times as many from one
  client address, which a whole department may share behind a proxy) until the window
  has passed, without even checking the password.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..errors import CtscreenError

if TYPE_CHECKING:
    from argon2 import PasswordHasher

ROLES = ("radiologist", "admin", "researcher")
# Roles that see the patient's name, ID and accession number; a researcher never does.
IDENTIFYING_ROLES = frozenset({"radiologist", "admin"})
MIN_PASSWORD_LENGTH = 10
USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
CLIENT_FAILURE_FACTOR = 4


@dataclass(frozen=True)
class User:
    id: int
    username: str
    role: str
    # the sites (hospitals of a regional centre) whose studies this user sees; None: all
    sites: tuple[str, ...] | None = None

    def sees_site(self, site: str) -> bool:
        return self.sites is None or site in self.sites

    @property
    def sees_identity(self) -> bool:
        """Whether pages show this user the patient's name, ID and accession number."""
        return self.role in IDENTIFYING_ROLES


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    created: float
    last_seen: float


class LoginRefused(CtscreenError):
    """Too many failed logins: wait for the window to pass."""


def _hasher() -> PasswordHasher:
    from argon2 import PasswordHasher

    return PasswordHasher()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def hash_password(password: str) -> str:
    return str(_hasher().hash(password))


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CtscreenError(
            f"expected a password of at least {MIN_PASSWORD_LENGTH} characters, "
            f"got {len(password)}"
        )


def _sites(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(json.loads(value))


def add_user(db: sqlite3.Connection, username: str, role: str, password: str, now: float,
             sites: Sequence[str] | None = None) -> None:
    """A new user; ``sites``: the sites whose studies they see (None: every site)."""
    if not USERNAME.match(username):
        raise CtscreenError(
            "expected a user name of 1-64 letters, digits and . _ @ -, got something else"
        )
    if role not in ROLES:
        raise CtscreenError(f"expected a role of {list(ROLES)}, got {role!r}")
    check_password_rules(password)
    try:
        with db:
            db.execute(
                "INSERT INTO users (username, role, password_hash, created_at, "
                "password_changed_at, sites) VALUES (?,?,?,?,?,?)",
                (username, role, hash_password(password), _iso(now), _iso(now),
                 None if sites is None else json.dumps(sorted(set(sites)))),
            )
    except sqlite3.IntegrityError:
        raise CtscreenError(f"a user named {username!r} exists already") from None


def set_password(db: sqlite3.Connection, username: str, password: str, now: float) -> None:
    """A new password; the user's sessions end."""
    check_password_rules(password)
    with db:
        n = db.execute(
            "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE username = ?",
            (hash_password(password), _iso(now), username),
        ).rowcount
        if not n:
            raise CtscreenError(f"expected an existing user name, got {username!r}")
        _end_sessions(db, username)


def set_disabled(db: sqlite3.Connection, username: str, disabled: bool) -> None:
    """Disable (or enable again) a user; disabling ends their sessions."""
    with db:
        n = db.execute(
            "UPDATE users SET disabled = ? WHERE username = ?", (int(disabled), username)
        ).rowcount
        if not n:
            raise CtscreenError(f"expected an existing user name, got {username!r}")
        if disabled:
            _end_sessions(db, username)


def _end_sessions(db: sqlite3.Connection, username: str) -> None:
    db.execute(
        "DELETE FROM sessions WHERE user_id IN (SELECT id FROM users WHERE username = ?)",
        (username,),
    )


def set_sites(db: sqlite3.Connection, username: str, sites: Sequence[str] | None) -> None:
    """The sites whose studies ``username`` sees (None: every site); their sessions end."""
    with db:
        n = db.execute("UPDATE users SET sites = ? WHERE username = ?",
                       (None if sites is None else json.dumps(sorted(set(sites))),
                        username)).rowcount
    if n != 1:
        raise CtscreenError(f"no user named {username!r}")
    _end_sessions(db, username)


def list_users(db: sqlite3.Connection) -> list[dict[str, object]]:
    return [
        {"username": r["username"], "role": r["role"], "disabled": bool(r["disabled"]),
         "created_at": r["created_at"], "password_changed_at": r["password_changed_at"],
         "sites": _sites(r["sites"])}
        for r in db.execute("SELECT * FROM users ORDER BY username")
    ]


# A hash to verify against where the user name is unknown, so that the answer takes as long
# as for a known name (no user enumeration by timing).
_DUMMY_HASH: list[str] = []


def authenticate(
    db: sqlite3.Connection, username: str, password: str, client: str, now: float,
    max_failures: int, window_s: float,
) -> User | None:
    """The user, where the name and password match an enabled user; None otherwise (and the
    failure counts).  Raises LoginRefused while the name or the client is over the limit."""
    from argon2.exceptions import InvalidHashError, VerificationError

    keys = (f"user:{username}", f"client:{client}")
    limits = (max_failures, max_failures * CLIENT_FAILURE_FACTOR)
    with db:
        db.execute("DELETE FROM login_failures WHERE at < ?", (now - window_s,))
    for key, limit in zip(keys, limits, strict=True):
        (n,) = db.execute(
            "SELECT COUNT(*) FROM login_failures WHERE key = ? AND at >= ?", (key, now - window_s)
        ).fetchone()
        if n >= limit:
            raise LoginRefused("too many failed logins; try again later")
    row = db.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    hasher = _hasher()
    if row is None:
        if not _DUMMY_HASH:
            _DUMMY_HASH.append(hasher.hash(secrets.token_hex(16)))
        stored = _DUMMY_HASH[0]
    else:
        stored = row["password_hash"]
    try:
        hasher.verify(stored, password)
        ok = row is not None and not row["disabled"]
    except (VerificationError, InvalidHashError):
        ok = False
    with db:
        if not ok:
            db.executemany("INSERT INTO login_failures (key, at) VALUES (?, ?)",
                           [(k, now) for k in keys])
            return None
        db.execute("DELETE FROM login_failures WHERE key = ?", (keys[0],))
        if hasher.check_needs_rehash(stored):
            db.execute("UPDATE users SET password_hash = ? WHERE id = ?",
                       (hasher.hash(password), row["id"]))
    return User(row["id"], row["username"], row["role"], _sites(row["sites"]))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(db: sqlite3.Connection, user: User, now: float) -> str:
    """A new session for ``user``: the token for the cookie (kept nowhere else)."""
    token = secrets.token_urlsafe(32)
    with db:
        db.execute(
            "INSERT INTO sessions (token_hash, user_id, csrf, created, last_seen) "
            "VALUES (?,?,?,?,?)",
            (_token_hash(token), user.id, secrets.token_urlsafe(32), now, now),
        )
    return token


def lookup_session(
    db: sqlite3.Connection, token: str, now: float, idle_s: float, max_s: float, touch: bool
) -> Session | None:
    """The live session of ``token`` (its last request moved to ``now`` where ``touch``),
    or None: unknown, expired (then deleted), or its user disabled."""
    if not token:
        return None
    th = _token_hash(token)
    r = db.execute(
        "SELECT s.*, u.username, u.role, u.disabled, u.sites FROM sessions s JOIN users u "
        "ON u.id = s.user_id WHERE s.token_hash = ?",
        (th,),
    ).fetchone()
    if r is None:
        return None
    if r["disabled"] or now - r["last_seen"] > idle_s or now - r["created"] > max_s:
        with db:
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (th,))
        return None
    if touch:
        with db:
            db.execute("UPDATE sessions SET last_seen = ? WHERE token_hash = ?", (now, th))
    user = User(r["user_id"], r["username"], r["role"], _sites(r["sites"]))
    return Session(user, r["csrf"], r["created"], now if touch else r["last_seen"])


def end_session(db: sqlite3.Connection, token: str) -> None:
    with db:
        db.execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),))


def prune_sessions(db: sqlite3.Connection, now: float, idle_s: float, max_s: float) -> None:
    with db:
        db.execute("DELETE FROM sessions WHERE last_seen < ? OR created < ?",
                   (now - idle_s, now - max_s))


def same_token(a: str, b: str) -> bool:
    """Constant-time comparison of two CSRF tokens (empty never matches)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
