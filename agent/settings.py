"""The site configuration: one TOML file, every key overridable from the environment.

The file is parsed with ``tomllib`` (so a syntax error names its line), then
``PLANTGATE__SECTION__KEY`` environment variables are laid over it, then the
whole is validated by pydantic-settings models. Each protocol module owns its
config model; this module only collects them, explicitly, by section name.

Environment overrides reach into lists too: ``PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD``
sets ``password`` of the MQTT sink named ``cloud`` (an index such as ``0`` works
as well). Values are parsed as TOML values when they look like one (numbers,
booleans, arrays), else taken as strings.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.config_types import ConfigModel, Duration, TagConfig
from agent.events import LANE_OF_TYPE, TRANSACTION_TYPES, TYPE_PREFIX
from agent.registry import SINKS, SOURCES
from agent.sink import SinkConfig
from agent.source import SourceConfig
from agent.units import Conversion, conversion

ENV_PREFIX = "PLANTGATE__"
DEFAULT_CONFIG = Path("/etc/plantgate/plantgate.toml")


class AgentSection(ConfigModel):
    """``[agent]``: who this agent is and where it keeps its state."""

    site: str = Field(min_length=1, description="Plant or site id; goes into every event's source and `site`")
    id: str = Field(default_factory=socket.gethostname, min_length=1, description="Agent id (default: the hostname)")
    data_dir: Path = Field(Path("/var/lib/plantgate"), description="State directory; relative paths resolve here")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")

    @field_validator("site", "id")
    @classmethod
    def _no_slash(cls, value: str) -> str:
        if "/" in value or any(ch.isspace() for ch in value):
            raise ValueError("must not contain '/' or spaces (it is part of the event source and MQTT topics)")
        return value


class BufferSection(ConfigModel):
    """``[buffer]``: the SQLite store-and-forward buffer."""

    path: Path = Field(Path("buffer.db"), description="Buffer file; relative to agent.data_dir")
    max_size_mb: float = Field(
        2048, gt=0, description="When reached: telemetry evicted first, then sources back-pressured"
    )
    telemetry_max_rows: int = Field(
        1_000_000, ge=0, description="Stored telemetry events kept at most; the oldest are evicted (with a gap event)"
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="full: every commit survives power loss; normal: survives a crash of the agent, not of the OS",
    )
    dedupe_window: Duration = Field(
        86_400.0,
        gt=0,
        description="A transaction or operational event id seen within this window is not stored again "
        "(remembered in the buffer file, across restarts)",
    )
    dedupe_max_ids: int = Field(
        200_000, ge=1, description="Ids remembered at most for dedupe_window; beyond it the oldest are forgotten first"
    )


class JournalSection(ConfigModel):
    """``[journal]``: the delivery journal, what happened to every transaction and operational event."""

    enabled: bool = Field(True, description="Keep the delivery journal (plantgate trace, outcomes, reconciliation)")
    retention: Duration = Field(
        30 * 86_400.0, gt=0, description="How long an event's journal record is kept after it was committed"
    )
    max_size_mb: float = Field(
        512, gt=0, description="The journal's share of the buffer file at most; beyond it the oldest records go first"
    )
    summary_interval: Duration = Field(
        3600.0,
        ge=0,
        description="Window of each io.plantgate.reconciliation.summary event (0 = no summary events)",
    )


class HttpSection(ConfigModel):
    """``[http]``: health, metrics and status (and, later, MES ingest)."""

    listen: str = Field("127.0.0.1:9480", description="host:port for /healthz, /readyz, /metrics, /status")
    ingest_token_file: Path | None = Field(None, description="Bearer token file for POST /v1/events")
    admin_token_file: Path | None = Field(
        None,
        description="Bearer token file for what changes state from the console and the admin API (replay, purge); "
        "without it the ingest token serves",
    )
    max_body_bytes: int = Field(1024 * 1024, gt=0, description="Largest request body accepted")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        from agent.http_server import parse_listen  # loads the HTTP server library: only when the key is given

        parse_listen(value)  # the same rule the server binds with
        return value


def _section(name: str, doc: str, registry: dict[str, type[Any]]) -> type[ConfigModel]:
    """A config section with one list per registered protocol (``[[sources.opcua]]``, ...)."""
    fields: dict[str, Any] = {
        key: (list[model], Field(default_factory=list, description=(model.__doc__ or key).strip().splitlines()[0]))  # type: ignore[valid-type]
        for key, model in registry.items()
    }
    section: type[ConfigModel] = create_model(name, __base__=ConfigModel, __doc__=doc, **fields)
    return section


SourcesSection = _section("SourcesSection", "``[sources]``: one list per protocol.", SOURCES)
SinksSection = _section("SinksSection", "``[sinks]``: one list per protocol.", SINKS)


TEMPLATE_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def template_tags(template: str) -> list[str]:
    """The tag names a template's ``{tag}`` placeholders name, in order; ``ValueError`` if it is malformed.

    ``{{`` and ``}}`` stand for literal braces; a lone brace or an empty ``{}`` is an error.
    """
    tags: list[str] = []
    for match in TEMPLATE_PLACEHOLDER.finditer(template):
        text = match.group(0)
        if text in ("{{", "}}"):
            continue
        name = match.group(1)
        if name is None:
            raise ValueError(f"template {template!r}: a lone {text!r}; write {text * 2!r} for a literal brace")
        if not name.strip():
            raise ValueError(f"template {template!r}: an empty placeholder {{}}; name a tag, e.g. {{press7.line}}")
        tags.append(name.strip())
    return tags


class FieldLiteral(ConfigModel):
    """A field value written in the rule itself: ``{ literal = "EA-LINE-3" }``."""

    literal: str | int | float | bool = Field(description="The value, as written")

    def __str__(self) -> str:
        return f"{{literal={self.literal!r}}}"


class FieldTemplate(ConfigModel):
    """A string built from tag values: ``{ template = "{press7.line}-{press7.work_order}" }``."""

    template: str = Field(
        min_length=1, description="Text with {tag} placeholders (tag names only); {{ and }} for literal braces"
    )

    def __str__(self) -> str:
        return f"{{template={self.template!r}}}"


class FieldEvent(ConfigModel):
    """A key of the triggering event's data (rules with ``when_event`` only): ``{ event = "lot" }``."""

    event: str = Field(min_length=1, description="Key of the triggering event's data, e.g. lot, gtin, quantity")

    def __str__(self) -> str:
        return f"{{event={self.event!r}}}"


EVENT_PLACEHOLDER = "event."
"""A template placeholder ``{event.<key>}`` of an event-triggered rule names the event's data, not a tag."""


def _field_form(value: Any) -> str | None:
    """Which form a field value is written in, so an error names that form alone (not all four)."""
    if isinstance(value, str):
        return "tag"
    if isinstance(value, FieldEvent) or (isinstance(value, dict) and "event" in value):
        return "event"
    if isinstance(value, FieldLiteral) or (isinstance(value, dict) and "literal" in value):
        return "literal"
    if isinstance(value, FieldTemplate) or (isinstance(value, dict) and "template" in value):
        return "template"
    return None


FieldValue = Annotated[
    Annotated[str, Tag("tag")]
    | Annotated[FieldLiteral, Tag("literal")]
    | Annotated[FieldTemplate, Tag("template")]
    | Annotated[FieldEvent, Tag("event")],
    Discriminator(
        _field_form,
        custom_error_type="field_form",
        custom_error_message='write a tag name, { literal = ... }, { template = "{tag}..." } or { event = "..." }',
    ),
]
"""A rule's field: a tag name (its value at the trigger's time), a literal, a template, or the event's data."""


def field_value_tags(value: FieldValue, event: bool = False) -> list[str]:
    """The tags a field value reads (``event``: the rule is event-triggered, ``{event.<key>}`` is no tag)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, FieldTemplate):
        names = template_tags(value.template)
        return [name for name in names if not name.startswith(EVENT_PLACEHOLDER)] if event else names
    return []


class RuleCondition(ConfigModel):
    """``condition``: the rule fires only while a tag holds one of some values at the trigger's time.

    For a ``state`` tag the value may be written as its state name (``"running"``) or
    as the raw value; for other tags as the raw value.
    """

    tag: str = Field(min_length=1, description="Tag whose value at the trigger's source time is tested")
    equals: str | int | float | bool | None = Field(None, description="The value (or state name) it must have")
    in_: list[str | int | float | bool] | None = Field(
        None, alias="in", min_length=1, description="Values (or state names) of which it must have one"
    )

    @model_validator(mode="after")
    def _one_test(self) -> RuleCondition:
        if (self.equals is None) == (self.in_ is None):
            raise ValueError("a condition needs exactly one of `equals` and `in`")
        return self

    @property
    def accepted(self) -> list[str | int | float | bool]:
        """The values (or state names) for which the condition holds."""
        return [self.equals] if self.equals is not None else list(self.in_ or [])


TriggerEdge = Literal["rising", "falling", "change", "increment"]


class TransactionRule(ConfigModel):
    """``[[transactions]]``: a business transaction fired by a trigger tag or by a source's event."""

    name: str = Field(min_length=1, description="Rule name (part of each event's stable id)")
    when: str = Field("", description="Trigger tag (exactly one of `when` and `when_event`)")
    when_event: str | None = Field(
        None,
        description=(
            "Fire on each event of this canonical type a source hands over (a scan, an MES event), "
            "e.g. goods.received or barcode.scanned; exactly one of `when` and `when_event`"
        ),
    )
    when_source: str | None = Field(None, description="With when_event: take only this source's events")
    every: Duration | None = Field(
        None,
        description=(
            'Fire at each wall-clock window boundary (multiples of this since the Unix epoch, UTC), e.g. "15m"; '
            "its counter fields get what was counted in the window; exclusive with `when` and `when_event`"
        ),
    )
    skip_zero: bool | None = Field(
        None, description="With every: no event for a window where every counter field is 0 (default true)"
    )
    on: TriggerEdge | None = Field(
        None,
        description=(
            "rising (false -> true) | falling (true -> false) | change (any new value) | increment (a counter grew); "
            "default: rising for a bool value, change otherwise"
        ),
    )
    condition: RuleCondition | None = Field(None, description="Fire only while this holds at the trigger's time")
    type: str = Field(description="Canonical transaction type, e.g. production.completed")
    fields: dict[str, FieldValue] = Field(
        default_factory=dict,
        description=(
            'data key -> tag name (its current value), { literal = ... }, { template = "{tag}-{tag}" } '
            'or { event = "key" } (the triggering event\'s data; rules with when_event)'
        ),
    )
    uom: str | None = Field(None, description="Unit of `quantity` fields (UN/ECE Rec 20, or mapped via [mappings.uom])")
    uom_to: str | None = Field(
        None, description="Convert `quantity` fields from `uom` into this UN/ECE Rec 20 code (same dimension)"
    )
    partitionkey: FieldValue | None = Field(
        None, description="Ordering key: a tag name, a literal or a template (default: the work order, else subject)"
    )
    ack: str | None = Field(None, description="Tag written true once the event is durably buffered (PLC handshake)")

    @field_validator("type")
    @classmethod
    def _canonical_type(cls, value: str) -> str:
        name = value.removeprefix(TYPE_PREFIX)
        if name not in TRANSACTION_TYPES:
            raise ValueError(f"{value!r} is not a transaction type; one of: {', '.join(TRANSACTION_TYPES)}")
        return name

    @field_validator("when_event")
    @classmethod
    def _event_type(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.removeprefix(TYPE_PREFIX)
        if name not in LANE_OF_TYPE or LANE_OF_TYPE[name] == "telemetry":
            raise ValueError(
                f"{value!r} is not an event type a source hands over, e.g. goods.received, barcode.scanned"
            )
        return name

    @model_validator(mode="after")
    def _one_trigger(self) -> TransactionRule:
        if [bool(self.when), self.when_event is not None, self.every is not None].count(True) != 1:
            raise ValueError(
                "a rule needs exactly one trigger: `when` (a tag), `when_event` (an event type) or `every` (a window)"
            )
        if self.every is not None:
            if self.every <= 0:
                raise ValueError("`every` must be a positive duration")
            for option, given in [("on", self.on), ("ack", self.ack), ("when_source", self.when_source)]:
                if given is not None:
                    raise ValueError(f"`{option}` goes with a triggered rule; a window rule fires on the clock")
            for key, value in [*self.fields.items(), ("partitionkey", self.partitionkey)]:
                if isinstance(value, FieldEvent):
                    raise ValueError(f"{key}: {{ event = ... }} needs a rule with `when_event`")
            return self
        if self.skip_zero is not None:
            raise ValueError("`skip_zero` goes with `every` (a window rule)")
        if self.when_event is None:
            if self.when_source is not None:
                raise ValueError("`when_source` goes with `when_event` (it picks whose events fire the rule)")
            for key, value in [*self.fields.items(), ("partitionkey", self.partitionkey)]:
                if isinstance(value, FieldEvent):
                    raise ValueError(f"{key}: {{ event = ... }} needs a rule with `when_event`")
        else:
            if self.on is not None:
                raise ValueError("`on` goes with `when` (a tag's edge); an event-triggered rule fires on each event")
            if self.ack is not None:
                raise ValueError("`ack` goes with `when` (a PLC handshake); an event-triggered rule has none")
        return self

    def read_tags(self) -> dict[str, str]:
        """Every tag the rule reads besides its trigger, each with the key path that names it."""
        found: dict[str, str] = {}
        event = self.when_event is not None
        for key, value in self.fields.items():
            for tag in field_value_tags(value, event):
                found.setdefault(tag, f"fields.{key}")
        if self.partitionkey is not None:
            for tag in field_value_tags(self.partitionkey, event):
                found.setdefault(tag, "partitionkey")
        if self.condition is not None:
            found.setdefault(self.condition.tag, "condition.tag")
        return found


class ItemMapping(ConfigModel):
    """A local item code that must not be posted."""

    obsolete: bool = Field(True, description="The code is obsolete: events using it become dead letters")


class MappingsSection(ConfigModel):
    """``[mappings]``: local codes -> canonical codes."""

    items: dict[str, str | ItemMapping] = Field(default_factory=dict, description="Local item code -> canonical code")
    uom: dict[str, str] = Field(default_factory=dict, description="Local unit -> UN/ECE Rec 20 code")
    unknown_items: Literal["pass", "dead-letter"] = Field(
        "pass", description="An item code not in [mappings.items]: pass unchanged, or make a dead letter"
    )
    plants: dict[str, str] = Field(
        default_factory=dict, description="Local plant code -> canonical plant id (fields plant, *_plant)"
    )
    lines: dict[str, str] = Field(
        default_factory=dict, description="Local line code -> canonical line id (fields line, *_line)"
    )
    work_centers: dict[str, str] = Field(
        default_factory=dict,
        description="Local work-center code -> canonical id (fields work_center, *_work_center)",
    )
    unknown_ids: Literal["pass", "dead-letter"] = Field(
        "pass",
        description=(
            "A plant, line or work-center code not in its mapping (nor one of its canonical ids): "
            "pass unchanged, or make a dead letter"
        ),
    )


class SequencingRule(ConfigModel):
    """``[[sequencing]]``: hold events of ``type`` until an ``after`` event of the same work order committed."""

    type: str = Field(description="Canonical event type to hold, e.g. material.consumed")
    after: list[str] = Field(
        min_length=1,
        description="Canonical event types that release it (one of them committed for the same work order)",
    )
    hold: Duration = Field(
        1800.0, gt=0, description="Held longer than this: a dead letter with sink `-` and reason `sequencing: ...`"
    )

    @field_validator("type")
    @classmethod
    def _guarded_type(cls, value: str) -> str:
        return _sequencing_type(value)

    @field_validator("after")
    @classmethod
    def _after_types(cls, value: list[str]) -> list[str]:
        return [_sequencing_type(item) for item in value]

    @model_validator(mode="after")
    def _not_after_itself(self) -> SequencingRule:
        if self.type in self.after:
            raise ValueError(f"after: {self.type!r} cannot wait for itself")
        return self


def _sequencing_type(value: str) -> str:
    name = value.removeprefix(TYPE_PREFIX)
    if name not in LANE_OF_TYPE or LANE_OF_TYPE[name] == "telemetry":
        raise ValueError(f"{value!r} is not a transaction or operational event type, e.g. material.consumed")
    return name


class Settings(BaseSettings):
    """The whole site configuration (``plantgate schema config`` prints its JSON Schema)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    agent: AgentSection
    buffer: BufferSection = BufferSection()
    http: HttpSection = HttpSection()
    journal: JournalSection = JournalSection()
    sources: SourcesSection = Field(default_factory=SourcesSection)  # type: ignore[valid-type]
    sinks: SinksSection = Field(default_factory=SinksSection)  # type: ignore[valid-type]
    transactions: list[TransactionRule] = Field(default_factory=list)
    mappings: MappingsSection = MappingsSection()
    sequencing: list[SequencingRule] = Field(
        default_factory=list, description="Events held until their work order's release (see [[sequencing]])"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file and the environment are merged by ``load_settings`` (list-aware, with
        # line numbers for errors); the model only validates what it is given.
        return (init_settings,)

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> Settings:
        from agent.http_server import is_loopback_listen

        # Beyond loopback the port takes MES transactions and buffer replay/purge from the
        # plant network: without a token anyone there could post or purge.
        if self.http.ingest_token_file is None and not is_loopback_listen(self.http.listen):
            raise ValueError(
                f"http.listen: {self.http.listen} is reachable from other hosts and needs http.ingest_token_file "
                "(a file holding a random token), or listen on 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        tags: dict[str, str] = {}
        for source in self.source_configs():
            for tag in source.tag_configs():
                if tag.tag in tags:
                    raise ValueError(f"tag {tag.tag!r} is defined by both {tags[tag.tag]!r} and {source.name!r}")
                tags[tag.tag] = source.name
        _unique("sources", [s.name for s in self.source_configs()])
        _unique("sinks", [s.name for s in self.sink_configs()])
        for key in SOURCES:
            for index, config in enumerate(getattr(self.sources, key)):
                for field, tag in config.referenced_tags().items():
                    if tag not in tags:
                        raise ValueError(f"sources.{key}.{index}.{field}: tag {tag!r} is not defined by any source")
        _unique("transactions", [rule.name for rule in self.transactions])
        guarded = [rule.type for rule in self.sequencing]
        for index, type_ in enumerate(guarded):
            if type_ in guarded[:index]:
                raise ValueError(f"sequencing.{index}.type: {type_!r} has an earlier [[sequencing]] entry")
        for index, rule in enumerate(self.transactions):
            where = f"transactions.{index}"
            forms = [(f"fields.{key}", value) for key, value in rule.fields.items()]
            for key, value in [*forms, ("partitionkey", rule.partitionkey)]:
                if isinstance(value, FieldTemplate):
                    try:
                        template_tags(value.template)
                    except ValueError as exc:
                        raise ValueError(f"{where}.{key}: {exc}") from None
            if rule.every is not None:
                kinds = self.tag_configs()
                counters = {
                    value: tags[value]
                    for value in rule.fields.values()
                    if isinstance(value, str) and value in tags and kinds[value].kind == "counter"
                }
                if not counters:
                    raise ValueError(f"{where}.fields: a window rule (`every`) needs a field naming a counter tag")
                if len(set(counters.values())) > 1:
                    raise ValueError(
                        f"{where}.fields: a window rule's counters must come from one source, "
                        f"not {', '.join(sorted(set(counters.values())))}"
                    )
            elif rule.when_event is None and rule.when not in tags:
                raise ValueError(f"{where}.when: tag {rule.when!r} is not defined by any source")
            if rule.when_source is not None and rule.when_source not in {s.name for s in self.source_configs()}:
                raise ValueError(f"{where}.when_source: {rule.when_source!r} is not a configured source")
            for field_tag, key in rule.read_tags().items():
                if field_tag not in tags:
                    raise ValueError(f"{where}.{key}: tag {field_tag!r} is not defined by any source")
            if rule.ack is not None and rule.ack not in tags:
                raise ValueError(f"{where}.ack: tag {rule.ack!r} is not defined by any source")
            if rule.ack is not None and not self.tag_configs()[rule.ack].writable:
                raise ValueError(
                    f"{where}.ack: tag {rule.ack!r} cannot be written (an input or discrete input); "
                    "use a coil or a holding register"
                )
            # A quantity taken from the event carries its own unit (a scan's AI 30/37 count is EA).
            has_quantity = any(
                (key == "quantity" or key.endswith("_quantity")) and not isinstance(value, FieldEvent)
                for key, value in rule.fields.items()
            )
            if has_quantity and rule.uom is None:
                raise ValueError(f"{where}.uom: a rule with a quantity field needs a unit (uom)")
            if rule.uom_to is not None:
                if rule.uom is None and rule.when_event is None:
                    raise ValueError(f"{where}.uom_to: converting needs the source unit in `uom`")
                try:
                    rule_conversion(rule, self.mappings)
                except ValueError as exc:
                    raise ValueError(f"{where}.uom_to: {exc}") from None
        return self

    def data_path(self, path: Path) -> Path:
        """Resolve a configured path against ``agent.data_dir``."""
        return path if path.is_absolute() else self.agent.data_dir / path

    def source_configs(self) -> list[SourceConfig]:
        """Every configured source, in registry then file order."""
        return [config for key in SOURCES for config in getattr(self.sources, key)]

    def sink_configs(self) -> list[SinkConfig]:
        """Every configured sink, in registry then file order."""
        return [config for key in SINKS for config in getattr(self.sinks, key)]

    def tag_configs(self) -> dict[str, TagConfig]:
        """Tag name -> its config, over every source."""
        return {tag.tag: tag for source in self.source_configs() for tag in source.tag_configs()}

    def tag_owner(self) -> dict[str, str]:
        """Tag name -> name of the source that defines it."""
        return {tag.tag: source.name for source in self.source_configs() for tag in source.tag_configs()}


def rule_conversion(rule: TransactionRule, mappings: MappingsSection) -> Conversion | None:
    """How a rule's quantities go from ``uom`` (mapped through ``[mappings.uom]``) to ``uom_to``, or None."""
    if rule.uom_to is None or rule.uom is None:
        return None
    return conversion(mappings.uom.get(rule.uom, rule.uom), mappings.uom.get(rule.uom_to, rule.uom_to))


def _unique(section: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{section}: the name {name!r} is used twice; names must be unique")
        seen.add(name)


# --- loading -------------------------------------------------------------------------------------


class ConfigError(Exception):
    """An invalid config: ``str(error)`` is the one line ``plantgate check`` prints."""

    def __init__(self, path: Path | None, key: str, message: str, line: int | None = None):
        self.path = path
        self.key = key
        self.message = message
        self.line = line
        where = str(path) if path is not None else "<config>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def default_config_path() -> Path:
    """``$PLANTGATE_CONFIG``, else ``/etc/plantgate/plantgate.toml``."""
    return Path(os.environ.get("PLANTGATE_CONFIG") or DEFAULT_CONFIG)


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate the config; raise ``ConfigError`` with file, line and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the config file: {exc.strerror}") from exc
    return parse_settings(text, path=path, environ=os.environ if environ is None else environ)


_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def parse_settings(text: str, *, path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate config ``text`` (TOML) with environment overrides from ``environ``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_LINE.search(message)
        line = int(match.group(1)) if match else None
        raise ConfigError(path, "", f"TOML syntax error: {_TOML_LINE.sub('', message).strip()}", line) from exc
    try:
        origins = apply_env_overrides(data, environ or {})
    except ValueError as exc:
        raise ConfigError(path, "environment", str(exc)) from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise _config_error(exc, text, path, origins) from exc


def _config_error(exc: ValidationError, text: str, path: Path | None, origins: Mapping[str, str]) -> ConfigError:
    """A validation error as the one line ``plantgate check`` prints: file, line, key, message."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key" + did_you_mean(error["loc"])
    elif error["type"] == "missing":
        message = "required key is missing"
    if not key and ": " in message and message.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum():
        # Cross-reference errors carry their own key path as a prefix.
        key, message = message.split(": ", 1)
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    from_env = next((env for dotted, env in origins.items() if key == dotted or key.startswith(dotted + ".")), None)
    if from_env is not None:
        return ConfigError(path, key, f"{message} (set by {from_env})")
    return ConfigError(path, key, message, line_of(text, key))


class _MappingsFile(BaseModel):
    """A config file read for its ``[mappings]`` alone (a reload): the other sections are not looked at."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    mappings: MappingsSection = MappingsSection()


def load_mappings(path: Path, running: Settings, environ: Mapping[str, str] | None = None) -> MappingsSection:
    """Read just ``[mappings]`` from the config file, for a reload (SIGHUP) of a running agent.

    Errors are reported as at start (``ConfigError`` with file, line and key);
    environment overrides of ``mappings.*`` apply as at start. The new units must
    still convert for the running ``[[transactions]]`` (their ``uom_to``).
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the config file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_LINE.search(message)
        line = int(match.group(1)) if match else None
        raise ConfigError(path, "", f"TOML syntax error: {_TOML_LINE.sub('', message).strip()}", line) from exc
    section = {"mappings": data["mappings"]} if "mappings" in data else {}
    prefix = ENV_PREFIX + "MAPPINGS__"
    environ = os.environ if environ is None else environ
    overrides = {name: raw for name, raw in environ.items() if name.startswith(prefix)}
    try:
        origins = apply_env_overrides(section, overrides)
    except ValueError as exc:
        raise ConfigError(path, "environment", str(exc)) from exc
    try:
        mappings = _MappingsFile(**section).mappings
    except ValidationError as exc:
        raise _config_error(exc, text, path, origins) from exc
    for index, rule in enumerate(running.transactions):
        try:
            rule_conversion(rule, mappings)
        except ValueError as exc:
            key = f"transactions.{index}.uom_to"
            line = line_of(text, "mappings.uom")
            raise ConfigError(path, "mappings.uom", f"{key} no longer converts: {exc}", line) from None
    return mappings


def did_you_mean(loc: tuple[int | str, ...]) -> str:
    """``"; did you mean `deadband`?"`` for a misspelt key at ``loc``, else ``""``.

    The candidates are the keys of the model the unknown key sits in, found by walking
    ``loc`` through the settings' field types.
    """
    keys = _keys_at(Settings, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), sorted(keys), n=1, cutoff=0.75) if keys else []
    return f"; did you mean `{close[0]}`?" if close else ""


def _keys_at(annotation: Any, loc: tuple[int | str, ...]) -> set[str]:
    """The keys (field names, or their aliases) of the model reached from ``annotation`` along ``loc``."""
    for model in _models_in(annotation):
        if not loc:
            return {field.alias or name for name, field in model.model_fields.items()}
        part = loc[0]
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is not None:
            return _keys_inside(field.annotation, loc[1:])
    return set()


def _keys_inside(annotation: Any, loc: tuple[int | str, ...]) -> set[str]:
    """Step through list indexes and dict keys until a model is reached."""
    origin = typing.get_origin(annotation)
    if loc and origin is list and isinstance(loc[0], int):
        return _keys_inside(typing.get_args(annotation)[0], loc[1:])
    if loc and origin is dict:
        return _keys_inside(typing.get_args(annotation)[1], loc[1:])
    return _keys_at(annotation, loc)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (``X``, ``X | None``, ``str | X``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Lay ``PLANTGATE__A__B=value`` over the parsed TOML, reaching into lists by name or index.

    A value stays a string (pydantic converts ``"0"`` or ``"true"`` where the key wants a
    number or a boolean) unless it is an array or inline table, or replaces a non-string
    value of the file. Returns the dotted key paths set, each with its variable's name.
    """
    origins: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not parts:
            continue
        node: Any = data
        path: list[str] = []
        for depth, part in enumerate(parts[:-1]):
            nxt = parts[depth + 1]
            if isinstance(node, list):
                item = _list_item(node, part, name)
                path.append(str(node.index(item)))
                node = item
            else:
                node = _child(node, part, list_expected=nxt.isdigit())
                path.append(part)
        last = parts[-1]
        if isinstance(node, list):
            _list_item(node, last, name)  # validates
            raise ValueError(f"{name}: cannot replace a whole list item; name one of its keys")
        existing = node.get(last)
        structured = raw.lstrip().startswith(("[", "{"))
        if structured or (existing is not None and not isinstance(existing, str)):
            node[last] = _env_value(raw)
        else:
            node[last] = raw
        origins[".".join([*path, last])] = name
    return origins


def _child(node: dict[str, Any], part: str, *, list_expected: bool) -> Any:
    if part not in node or not isinstance(node[part], dict | list):
        node[part] = [] if list_expected else {}
    return node[part]


def _list_item(items: list[Any], part: str, env_name: str) -> dict[str, Any]:
    if part.isdigit() and int(part) < len(items):
        item: dict[str, Any] = items[int(part)]
        return item
    for item in items:
        if isinstance(item, dict) and str(item.get("name", "")).lower() == part:
            return item
    raise ValueError(f"{env_name}: no list item named or numbered {part!r}")


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def line_of(text: str, key: str) -> int | None:
    """Best-effort line number of a dotted key path (``sources.opcua.0.tags.1.kind``) in TOML text."""
    if not key:
        return None
    target = key.split(".")
    table: list[str] = []
    counters: dict[tuple[str, ...], int] = {}
    best: int | None = None
    header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assignment = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        match = header.match(line)
        if match:
            names = [part.strip().strip("\"'") for part in match.group(2).split(".")]
            resolved: list[str] = []
            for depth, part in enumerate(names):
                resolved.append(part)
                prefix = tuple(resolved)
                if match.group(1) == "[[" and depth == len(names) - 1:
                    counters[prefix] = counters.get(prefix, -1) + 1
                    # A new array element resets the counters of arrays nested inside it.
                    for other in [k for k in counters if len(k) > len(prefix) and k[: len(prefix)] == prefix]:
                        del counters[other]
                if prefix in counters:
                    resolved.append(str(counters[prefix]))
            table = resolved
            if _is_prefix(table, target):
                best = number
            continue
        match = assignment.match(line)
        if match and _is_prefix([*table, match.group(1).strip("\"'")], target):
            return number
    return best


def _is_prefix(path: list[str], target: list[str]) -> bool:
    return len(path) <= len(target) and target[: len(path)] == path
