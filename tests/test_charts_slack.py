"""Charts in Slack and in the shell: `/db status <customer> --chart` and `/db servers --chart`
answer with the reply and then the PNG uploaded to the channel; the capacity review's checklist
carries the fleet's disk chart in its thread; the shell saves each PNG and prints its path.
/db status shows the server's disk runway and the database's recovery window, /db servers each
server's runway, with the JSON's own numbers.

Uploads go through slack_sdk's files_upload_v2 to the strict stub (tests/slack_stub.py), whose
files.getUploadURLExternal / upload URL / files.completeUploadExternal are held to Slack's
rules here first. The sandbox's history is a simulated three days that ended 18 hours ago
(vps1 filling 1 GiB a day: about 19.25 days left, far from a whole day either side, so the
runway reads the same all hour), and the charts are drawn at a fixed clock, so the bytes
uploaded are compared with the chart core draws.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from PIL import Image
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import SectionBlock
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import Engine

from bot.attachments import save
from bot.commands.catalog import build_registry
from bot.commands.roles import Roles
from bot.commands.router import Router, parse
from bot.notifiers import SlackNotifier, upload_all, web_client
from bot.runtime import Runtime
from bot.scheduler import Worker
from bot.shell import Shell
from bot.views import render
from bot.views.blocks import Reply, escape
from core import checklists as cl
from core.capacity import Attachment, review_text
from core.customers import customer_from_mapping, upsert_customers
from core.fleet import Fleet, parse_fleet
from core.notify import NotifyError, RecordingNotifier
from core.ops import Ops
from core.settings import load_settings
from core.trends import DatabaseSample, History, Measurements
from core.units import pretty_age
from storage.db import make_engine
from storage.events import EventLog
from storage.migrate import upgrade
from tests.history_sim import simulate
from tests.slack_app import SlackApp
from tests.slack_stub import BOT_TOKEN, SlackStub, slash_body
from tests.test_blocks_contract import check_contract

ALICE = "U_ALICE"  # an operator
OPS = "C0DBOPS"  # where alice types
OPS_NAME = "#db-ops"  # the ops channel as configured: checklists go there
TZ = ZoneInfo("America/New_York")
PNG = b"\x89PNG\r\n\x1a\n"
REGISTRY = build_registry()


# --- the stub: files.getUploadURLExternal, the upload URL, files.completeUploadExternal ------


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    with SlackStub() as s:
        yield s
        s.expect_refusals(*{c.error or "" for c in s.refused()})  # these tests refuse on purpose


@pytest.fixture
def client(stub: SlackStub) -> WebClient:
    return WebClient(token=BOT_TOKEN, base_url=stub.base_url)


def error_of(call: Any) -> tuple[str, list[str]]:
    """Slack's error code and its reasons (response_metadata.messages)."""
    with pytest.raises(SlackApiError) as refused:
        call()
    answer = refused.value.response
    return str(answer["error"]), list((answer.get("response_metadata") or {}).get("messages", []))


def ticket(client: WebClient, length: int, filename: str = "c.png") -> tuple[str, str]:
    got = client.files_getUploadURLExternal(filename=filename, length=length)
    return str(got["upload_url"]), str(got["file_id"])


def test_files_upload_v2_lands_with_its_bytes_sync_and_async(
    stub: SlackStub, client: WebClient
) -> None:
    thread = stub.existing(OPS, "the checklist")
    done = client.files_upload_v2(
        channel=OPS,
        file=PNG + b"one",
        filename="one.png",
        title="One",
        initial_comment="the first",
        thread_ts=thread,
    )
    assert done["file"]["title"] == "One"

    async def upload() -> None:
        async_client = AsyncWebClient(token=BOT_TOKEN, base_url=stub.base_url)
        await async_client.files_upload_v2(channel=OPS, file=PNG + b"two!", filename="two.png")

    asyncio.run(upload())
    one, two = stub.files(OPS)
    assert (one.data, one.title, one.thread_ts, one.initial_comment) == (
        PNG + b"one",
        "One",
        thread,
        "the first",
    )
    assert (two.data, two.filename, two.title) == (PNG + b"two!", "two.png", "two.png")
    assert two.thread_ts is None and two.initial_comment is None
    kinds = [c.kind for c in stub.calls]
    assert kinds == ["files.getUploadURLExternal", "upload", "files.completeUploadExternal"] * 2


def test_an_upload_url_is_refused_as_slack_refuses_it(stub: SlackStub, client: WebClient) -> None:
    ask = client.api_call
    assert error_of(lambda: ask("files.getUploadURLExternal", params={"length": 10})) == (
        "invalid_arguments",
        ["[ERROR] missing required field: filename"],
    )
    assert error_of(lambda: ask("files.getUploadURLExternal", params={"filename": "a.png"})) == (
        "invalid_arguments",
        ["[ERROR] missing required field: length"],
    )
    for bad in ("0", "-5", "ten"):
        code, _ = error_of(lambda: client.files_getUploadURLExternal(filename="a", length=bad))  # type: ignore[arg-type]
        assert code == "invalid_arguments", bad
    stub.file_limit_bytes = 1000  # the team restricts large uploads
    assert ticket(client, 1000)[1].startswith("F")
    code, _ = error_of(lambda: client.files_getUploadURLExternal(filename="a", length=1001))
    assert code == "file_upload_size_restricted"
    long_alt = "x" * 1001
    code, _ = error_of(
        lambda: client.files_getUploadURLExternal(filename="a", length=5, alt_txt=long_alt)
    )
    assert code == "alt_txt_too_large"
    stub.scopes.discard("files:write")
    with pytest.raises(SlackApiError) as refused:
        client.files_getUploadURLExternal(filename="a.png", length=5)
    assert refused.value.response["error"] == "missing_scope"
    assert refused.value.response["needed"] == "files:write"


def test_the_bytes_posted_must_be_the_length_declared(stub: SlackStub, client: WebClient) -> None:
    url, _ = ticket(client, 8)
    assert httpx.post(url, content=b"1234567").status_code == 400  # one short
    assert httpx.post(url, content=b"123456789").status_code == 400  # one over
    unknown = url.rsplit("/", 1)[0] + "/nope"
    assert httpx.post(unknown, content=b"12345678").status_code == 404
    answer = httpx.post(url, content=b"12345678")
    assert (answer.status_code, answer.text) == (200, "OK - 8")
    # Multipart, as Slack also takes it: the file part's bytes count.
    url, file_id = ticket(client, 4)
    assert httpx.post(url, files={"file": ("c.png", b"abcd")}).status_code == 200
    client.files_completeUploadExternal(files=[{"id": file_id, "title": "c"}], channel_id=OPS)
    assert stub.files(OPS)[-1].data == b"abcd"
    # Completed: the URL is used up.
    assert httpx.post(url, files={"file": ("c.png", b"abcd")}).status_code == 404
    refused = [c.error for c in stub.refused()]
    assert refused == ["length_mismatch", "length_mismatch", "not_found", "not_found"]


def test_completing_refuses_what_was_not_uploaded_twice_or_nowhere(
    stub: SlackStub, client: WebClient
) -> None:
    def complete(file_id: str, **where: Any) -> Any:
        return lambda: client.files_completeUploadExternal(
            files=[{"id": file_id, "title": "t"}], **where
        )

    url, file_id = ticket(client, 3)
    code, why = error_of(complete(file_id, channel_id=OPS))
    assert code == "file_not_found"
    assert why == [f"[ERROR] {file_id}: nothing was posted to its upload_url"]
    assert httpx.post(url, content=b"abc").status_code == 200
    code, why = error_of(complete("F0NOSUCHFILE", channel_id=OPS))
    assert (code, why) == ("file_not_found", ["[ERROR] F0NOSUCHFILE: no upload has this id"])
    # A file shared nowhere (Slack would keep it private: nobody would see the chart).
    assert error_of(complete(file_id))[0] == "invalid_arguments"
    assert error_of(complete(file_id, channel_id="#db-ops"))[0] == "channel_not_found"
    locked = stub.add_channel("vault", private=True, member=False)
    assert error_of(complete(file_id, channel_id=locked))[0] == "not_in_channel"
    stub.remove_channel("general")
    assert error_of(complete(file_id, channel_id=stub.channel_id("general")))[0] == (
        "channel_not_found"
    )
    ask = client.api_call
    bad_json = {"files": "[{", "channel_id": OPS}
    assert error_of(lambda: ask("files.completeUploadExternal", params=bad_json))[0] == (
        "invalid_arguments"
    )
    assert stub.files() == []  # nothing was shared by any of that
    assert complete(file_id, channel_id=OPS)()["ok"]
    code, why = error_of(complete(file_id, channel_id=OPS))
    assert code == "file_not_found"
    assert why == [f"[ERROR] {file_id}: already completed: a file is completed once"]
    (shared,) = stub.files()
    assert (shared.id, shared.channel, shared.data) == (file_id, OPS, b"abc")


def test_the_notifier_uploads_to_a_channel_named_or_says_why_not(
    stub: SlackStub, client: WebClient
) -> None:
    chart = Attachment("c.png", "A chart", PNG + b"c", "a <!channel> & more")
    notifier = SlackNotifier(client)
    notifier.upload("#db-ops", chart)  # the ops channel as configured: looked up by name
    (shared,) = stub.files()
    assert shared.channel == stub.channel_id("db-ops") and shared.data == PNG + b"c"
    assert shared.initial_comment == "a &lt;!channel&gt; &amp; more"  # shown, never a ping
    with pytest.raises(NotifyError) as missing:
        notifier.upload("#no-such-channel", chart)
    assert missing.value.permanent
    # upload_all: the outbox's placeholder is no thread yet; a refusal is a line, not a raise.
    assert upload_all(notifier, OPS, [chart], thread_ts="outbox:12") == []
    assert stub.files(OPS)[0].thread_ts is None
    stub.scopes.discard("files:write")
    (failed,) = upload_all(notifier, OPS, [chart])
    assert "missing_scope" in failed
    assert upload_all(RecordingNotifier(), OPS, [chart]) == []  # it sends no files


def test_an_upload_nobody_expected_to_be_refused_fails_the_test() -> None:
    with SlackStub() as stub:
        url, _ = ticket(WebClient(token=BOT_TOKEN, base_url=stub.base_url), 3)
        httpx.post(url, content=b"ab")
        with pytest.raises(AssertionError, match="length_mismatch"):
            stub.check()
        stub.expect_refusals("length_mismatch")


# --- the bot --------------------------------------------------------------------------------


@dataclass
class Month:
    """The session sandbox's customers in a database whose history ends 18 hours before
    ``now`` (the clock charts are drawn at)."""

    engine: Engine
    events: EventLog
    now: datetime


@pytest.fixture(scope="module")
def month(sandbox: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Month]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('charts-slack') / 'dbops.db'}")
    upgrade(engine)
    upsert_customers(engine, [customer_from_mapping(c) for c in sandbox["customers"]])
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start = now.replace(minute=0) - timedelta(days=3, hours=18)
    history = History(engine)
    # vps1: 80 GiB of 100 at the end, 1 GiB a day more; vps2 half that; vps3 none.
    sim = simulate(
        history,
        days=3,
        step=timedelta(hours=1),
        compact_every=24,
        customers=0,
        start=start,
        names=("vps1", "vps2"),
    )
    for i in range(72):  # acme's size and connections, hourly
        at = start + timedelta(hours=i)
        sample = DatabaseSample("acme", "vps1", 10**8 + i * 10**6, connections=i % 7)
        history.record(Measurements((), (sample,)), at)
    history.compact(sim.now)
    yield Month(engine, EventLog(engine), now)
    engine.dispose()


@pytest.fixture(scope="module")
def fleet(sandbox_fleet: Fleet) -> Fleet:
    """The sandbox, its commands run locally and without pgBackRest: a sweep in tenths of a
    second rather than seconds over SSH (neither is what most tests here are about; the
    recovery window's test has the sandbox as it is)."""
    data = sandbox_fleet.model_dump(exclude={"base_dir"})
    for server in data["servers"]:
        server["pgbackrest_config"] = None
        server["transport"] = "local"
    return parse_fleet(data, base_dir=sandbox_fleet.base_dir)


@pytest.fixture
def rt(month: Month, fleet: Fleet) -> Iterator[Runtime]:
    """The bot with no Slack (the shell's), at the month's clock."""
    made = Runtime(
        load_settings(slack_bot_token=None, timezone=TZ.key),
        engine=month.engine,
        events=month.events,
        fleet=fleet,
        clock=lambda: month.now,
    )
    yield made
    made.close()


@dataclass
class Desk:
    rt: Runtime
    router: Router
    stub: SlackStub

    def slash(self, text: str, channel: str = OPS) -> str:
        """`/db <text>` typed by alice in ``channel``, signed, through Bolt, its work done:
        the response_url's token."""
        token = uuid.uuid4().hex
        body = slash_body(
            text, user=ALICE, channel=channel, response_url=self.stub.response_url(token)
        )
        slack = SlackApp(self.router, self.stub)

        async def scenario() -> int:
            try:
                status, _ = await slack.send(body)
                return status
            finally:
                await slack.close()

        assert asyncio.run(scenario()) == 200
        return token


@pytest.fixture
def desk(month: Month, fleet: Fleet) -> Iterator[Desk]:
    with SlackStub() as stub:
        made = Runtime(
            load_settings(
                slack_bot_token=BOT_TOKEN,
                slack_api_url=stub.base_url,
                ops_channel=OPS_NAME,
                timezone=TZ.key,
            ),
            engine=month.engine,
            events=month.events,
            fleet=fleet,
            clock=lambda: month.now,
        )
        try:
            yield Desk(made, router_of(made), stub)
        finally:
            made.close()
            from bot.outbox import forget_outbox_notifiers

            forget_outbox_notifiers()


def router_of(rt: Runtime) -> Router:
    return Router(rt, roles=Roles(operators=frozenset({ALICE})), registry=REGISTRY)


def decoded(png: bytes | None) -> Image.Image:
    assert png is not None and png.startswith(PNG)
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.size == (800, 450)
    assert len(image.getcolors(maxcolors=100_000) or []) > 20  # drawn on, not a blank page
    return image


def mrkdwn_of(reply: Reply) -> str:
    """Every section's mrkdwn, a line per line."""
    return "\n".join(
        str(b.text.text) for b in reply.blocks if isinstance(b, SectionBlock) and b.text
    )


def runway_check(entry: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in entry["checks"] if c["name"] == "disk_runway")


def test_chart_is_a_switch_that_parses_back() -> None:
    command = parse("status acme --chart", REGISTRY)
    assert dict(command.args) == {"customer": "acme", "chart": "on"}
    assert command.line == "status acme --chart"
    assert parse("status --CHART acme", REGISTRY).args == command.args
    assert "chart" not in parse("status acme", REGISTRY).args
    assert parse("servers --chart", REGISTRY).line == "servers --chart"
    assert REGISTRY.get("status").usage == "/db status <customer> [--chart]"  # type: ignore[union-attr]
    assert REGISTRY.get("servers").usage == "/db servers [--chart]"  # type: ignore[union-attr]


def test_status_chart_goes_to_the_channel_after_the_reply(desk: Desk) -> None:
    token = desk.slash("status acme --chart")
    stub = desk.stub
    (reply,) = stub.replies_to(token)
    assert "acme" in reply.text and "Disk runway" in reply.text
    (upload,) = stub.files(OPS)
    decoded(upload.data)
    drawn = desk.rt.ops.customer_chart("acme", desk.rt.clock())
    assert upload.data == drawn.png  # acme's size and connections, as core draws them
    assert upload.title == drawn.title == "acme: size and connections over 30 days"
    assert upload.filename == f"acme-{desk.rt.clock():%Y%m%d-%H%M}.png"
    assert upload.initial_comment == "`/db status acme --chart`"
    assert upload.thread_ts is None
    kinds = [c.kind for c in stub.calls]
    assert kinds.index("response") < kinds.index("files.getUploadURLExternal")  # reply first
    assert stub.refused() == []


def test_servers_chart_shows_the_runway_the_check_has(desk: Desk) -> None:
    token = desk.slash("servers --chart")
    servers = {s["name"]: s for s in desk.rt.ops.servers()}
    vps1 = runway_check(servers["vps1"])
    assert vps1["verdict"] == "warn" and vps1["value"] == servers["vps1"]["runway"]["days"] == 19
    (reply,) = desk.stub.replies_to(token)
    assert "*vps1*: PostgreSQL up" in reply.text
    assert f"full in {vps1['value']} days" in reply.text
    (upload,) = desk.stub.files(OPS)
    decoded(upload.data)
    drawn = desk.rt.ops.fleet_chart(desk.rt.clock())
    assert upload.data == drawn.png and upload.title == drawn.title
    assert "vps1 full in 19 d" in drawn.title  # the projection the chart draws: the same fit


def test_a_channel_that_refuses_the_chart_gets_a_note_not_a_lost_reply(desk: Desk) -> None:
    vault = desk.stub.add_channel("vault", private=True, member=False)
    desk.stub.expect_refusals("not_in_channel")
    token = desk.slash("status acme --chart", channel=vault)
    reply, note = desk.stub.replies_to(token)
    assert "acme" in reply.text
    assert "I could not post the chart here (not_in_channel)" in note.text
    assert "/invite @dbops" in note.text and note.body["response_type"] == "ephemeral"
    assert desk.stub.files() == []
    (refused,) = desk.stub.refused()
    assert refused.kind == "files.completeUploadExternal"


def test_the_capacity_review_carries_the_fleet_chart_in_its_thread(desk: Desk) -> None:
    # The runtime's own notifier: the outbox, whose Slack client uploads the chart.
    worker = Worker(desk.rt)
    state = worker.checklist("capacity-review")
    stub = desk.stub
    (posted,) = [m for m in stub.messages(OPS_NAME) if "Monthly capacity" in m.get("text", "")]
    assert state.message_ts == posted["ts"]
    (upload,) = stub.files(OPS_NAME)
    assert upload.thread_ts == posted["ts"]  # in the checklist's thread
    decoded(upload.data)
    now = desk.rt.clock()
    (chart,) = desk.rt.ops.checklist_attachments(cl.get_checklist("capacity-review"), now)
    assert upload.data == chart.png and upload.filename == f"fleet-disk-{now:%Y%m%d}.png"
    # The review's figures as the message with it (mrkdwn: escaped, shown as typed).
    assert upload.initial_comment == escape(review_text(desk.rt.ops.capacity_review(now)))
    assert "vps1: 19 days" in (upload.initial_comment or "")
    sent = [e for e in desk.rt.events.tail(20) if e.kind == "message.sent"]
    assert [e.payload["file"] for e in sent if e.payload.get("how") == "upload"] == [
        upload.filename
    ]
    # A checklist with nothing to attach uploads nothing.
    worker.checklist("weekly-maintenance")
    assert len(stub.files()) == 1
    assert stub.refused() == []


def test_a_chart_slack_refuses_is_said_in_the_checklists_thread(desk: Desk) -> None:
    desk.stub.scopes.discard("files:write")  # installed before the manifest asked for it
    desk.stub.expect_refusals("missing_scope")
    notifier = SlackNotifier(web_client(desk.rt.settings), desk.rt.events)
    state = Worker(desk.rt.with_notifier(notifier)).checklist("capacity-review")
    assert desk.stub.files() == []
    thread = [m for m in desk.stub.messages(OPS_NAME) if m.get("thread_ts") == state.message_ts]
    (note,) = [m for m in thread if m["ts"] != state.message_ts]
    assert "did not go" in note["text"] and "missing_scope" in note["text"]


def test_the_checklist_command_in_slack_says_the_chart_went(desk: Desk) -> None:
    token = desk.slash("checklist capacity-review")
    (reply,) = desk.stub.replies_to(token)
    assert "with 1 chart in its thread" in reply.text
    (upload,) = desk.stub.files(OPS_NAME)
    (posted,) = [m for m in desk.stub.messages(OPS_NAME) if m["ts"] == upload.thread_ts]
    assert "Monthly capacity review" in posted["text"]


def test_the_shell_saves_each_chart_and_prints_its_path(rt: Runtime, tmp_path: Path) -> None:
    out = io.StringIO()
    shell = Shell(router_of(rt), ALICE, out, charts_dir=tmp_path)
    now = rt.clock()
    shell.loop(["/db status acme --chart", "/db servers --chart"])
    shell.loop(["/db checklist capacity-review"])
    text = out.getvalue()
    status = tmp_path / f"acme-{now:%Y%m%d-%H%M}.png"
    fleet = tmp_path / f"fleet-disk-{now:%Y%m%d-%H%M}.png"
    review = tmp_path / f"fleet-disk-{now:%Y%m%d}.png"
    assert sorted(tmp_path.iterdir()) == sorted([status, fleet, review])
    for path in (status, fleet, review):
        decoded(path.read_bytes())
        assert f"Chart saved: {path} (" in text
    assert status.read_bytes() == rt.ops.customer_chart("acme", now).png
    assert fleet.read_bytes() == rt.ops.fleet_chart(now).png
    assert "acme is online on vps1" in text and "☐ Disk growth per server" in text


def test_a_saved_chart_never_replaces_a_file(tmp_path: Path) -> None:
    chart = Attachment("acme-1.png", "acme", PNG + b"new", "")
    (tmp_path / "acme-1.png").write_bytes(b"older")
    assert save(chart, tmp_path) == tmp_path / "acme-1-2.png"
    assert save(chart, tmp_path) == tmp_path / "acme-1-3.png"
    assert (tmp_path / "acme-1.png").read_bytes() == b"older"
    assert (tmp_path / "acme-1-3.png").read_bytes() == PNG + b"new"
    # A name from elsewhere cannot leave the directory.
    escaping = Attachment("../../etc/x.png", "x", PNG, "")
    assert save(escaping, tmp_path / "charts") == tmp_path / "charts" / "x.png"


def test_status_shows_the_runway_and_recovery_the_json_has(
    month: Month, sandbox_fleet: Fleet
) -> None:
    # The sandbox as it is: pgBackRest over SSH, read within a deadline a loaded machine meets.
    ops = Ops(sandbox_fleet, month.engine, month.events)
    try:
        status = ops.status("acme", deadline_s=20)
    finally:
        ops.close()
    check = runway_check(status["server"])
    runway = status["server"]["runway"]
    assert runway["days"] == check["value"] == 19 and runway["verdict"] == check["verdict"]
    reply = render.status_reply(status, TZ)
    check_contract("status with runway and recovery", reply)
    text = mrkdwn_of(reply)
    assert f"*Disk runway* (vps1): :large_yellow_circle: full in {check['value']} days" in text
    assert f"(about {render.local_time(runway['full_at'], TZ)})" in text
    recovery = status["database"]["recovery"]
    assert recovery is not None, "the sandbox archives its WAL with pgBackRest"
    assert (
        f"*Recovery*: to any moment from {render.local_time(recovery['earliest'], TZ)} to "
        f"{render.local_time(recovery['latest'], TZ)}, RPO {pretty_age(recovery['rpo_seconds'])}"
    ) in text
    # Without a recovery window or a history: says so, and shows no runway.
    status["database"]["recovery"] = None
    status["server"]["runway"] = None
    bare = mrkdwn_of(render.status_reply(status, TZ))
    assert "no point-in-time recovery (back to the last backup)" in bare
    assert "Disk runway" not in bare


def test_servers_shows_each_runway_as_the_check_has_it(rt: Runtime) -> None:
    servers = rt.ops.servers()
    reply = render.servers_reply(servers, TZ)
    check_contract("servers with runway", reply)
    text = mrkdwn_of(reply)
    lines = {}
    for s in servers:
        lines[s["name"]] = next(ln for ln in text.split("\n") if f"*{s['name']}*" in ln)
    for s in servers:
        check = runway_check(s)
        assert s["runway"]["days"] == check["value"]
        if check["value"] is not None:
            assert lines[s["name"]].endswith(f"full in {check['value']} days")
    assert lines["vps1"].endswith("full in 19 days")
    vps2 = runway_check(next(s for s in servers if s["name"] == "vps2"))
    assert vps2["verdict"] == "ok" and lines["vps2"].endswith(f"full in {vps2['value']} days")
    assert "full in" not in lines["vps3"]  # no history: unknown, nothing claimed
