"""prefd.v1.TemplateService: named bundles of preference values, kept by admins and applied as one write."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from prefd.v1 import templates_pb2, templates_pb2_grpc
from prefd_server.kernel.errors import invalid
from prefd_server.kernel.model import ScopeKind
from prefd_server.kernel.paging import paginate
from prefd_server.kernel.tokens import TokenKey
from prefd_server.preferences import convert as preference_convert
from prefd_server.preferences.rules import write_org
from prefd_server.preferences.template_book import TemplateBook
from prefd_server.preferences.templates import MAX_TEMPLATE_KEYS, Template
from prefd_server.rpc import convert
from prefd_server.rpc.principal import current_call, current_principal

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def template_from_pb(message: templates_pb2.Template) -> tuple[Template, list[str]]:
    """A Template from a request, and its keys in request order (for field paths)."""
    kind = convert.SCOPE_KINDS.get(message.scope_kind)
    if len(message.values) > MAX_TEMPLATE_KEYS:
        raise invalid("template.values", f"must hold at most {MAX_TEMPLATE_KEYS} keys")
    values = {
        v.key: convert.value_from_pb(v.value, f"template.values[{i}].value") for i, v in enumerate(message.values)
    }
    template = Template(
        name=message.name,
        scope_kind=kind if kind is not None else ScopeKind.GLOBAL,  # GLOBAL is refused by the checks
        values=values,
        description=message.description,
    )
    return template, [v.key for v in message.values]


def template_to_pb(template: Template) -> templates_pb2.Template:
    return templates_pb2.Template(
        name=template.name,
        description=template.description,
        scope_kind=convert.SCOPE_KINDS_PB[template.scope_kind],
        values=[
            templates_pb2.TemplateValue(key=key, value=convert.value_to_pb(template.values[key]))
            for key in sorted(template.values)
        ],
        version=template.version,
        create_time=convert.timestamp(template.created_at),
        update_time=convert.timestamp(template.updated_at),
        updated_by=template.updated_by,
        times_applied=template.times_applied,
        last_applied_time=convert.timestamp(template.last_applied_at),
    )


class TemplateService(templates_pb2_grpc.TemplateServiceServicer):
    """Templates: admins keep them; admins apply any, a user applies a USER template to itself."""

    SERVICE_NAME: str = templates_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name
    add_to_server = staticmethod(templates_pb2_grpc.add_TemplateServiceServicer_to_server)

    def __init__(self, book: TemplateBook, tokens: TokenKey) -> None:
        self._book = book
        self._tokens = tokens

    async def CreateTemplate(
        self, request: templates_pb2.CreateTemplateRequest, context: Context
    ) -> templates_pb2.CreateTemplateResponse:
        template, keys = template_from_pb(request.template)
        stored = await self._book.create(template, keys, current_call())
        return templates_pb2.CreateTemplateResponse(template=template_to_pb(stored))

    async def UpdateTemplate(
        self, request: templates_pb2.UpdateTemplateRequest, context: Context
    ) -> templates_pb2.UpdateTemplateResponse:
        template, keys = template_from_pb(request.template)
        expected = request.expected_version if request.HasField("expected_version") else None
        stored = await self._book.update(template, keys, expected, current_call())
        return templates_pb2.UpdateTemplateResponse(template=template_to_pb(stored))

    async def GetTemplate(
        self, request: templates_pb2.GetTemplateRequest, context: Context
    ) -> templates_pb2.GetTemplateResponse:
        return templates_pb2.GetTemplateResponse(template=template_to_pb(await self._book.get(request.name)))

    async def ListTemplates(
        self, request: templates_pb2.ListTemplatesRequest, context: Context
    ) -> templates_pb2.ListTemplatesResponse:
        page = paginate({"rpc": "ListTemplates"}, request.page_size, request.page_token, self._tokens)
        found = await self._book.page(page.after, page.limit)
        templates, next_token = page.cut(found, lambda t: t.name)
        return templates_pb2.ListTemplatesResponse(
            templates=[template_to_pb(t) for t in templates], next_page_token=next_token
        )

    async def DeleteTemplate(
        self, request: templates_pb2.DeleteTemplateRequest, context: Context
    ) -> templates_pb2.DeleteTemplateResponse:
        await self._book.delete(request.name)
        return templates_pb2.DeleteTemplateResponse()

    async def ApplyTemplate(
        self, request: templates_pb2.ApplyTemplateRequest, context: Context
    ) -> templates_pb2.ApplyTemplateResponse:
        principal = current_principal()
        scope = convert.scope_from_pb(request.scope)
        principal.require_write(scope)
        convert.check_reason(request.reason)
        org_id = write_org(request.org_id, scope.kind, principal.org, principal.is_admin)
        result, template = await self._book.apply(
            request.name, scope, org_id, request.reason, request.dry_run, current_call()
        )
        return templates_pb2.ApplyTemplateResponse(
            changes=preference_convert.changes_to_pb(result),
            effective_values=convert.effective_to_pb(result.effective),
            dry_run=result.dry_run,
            template_version=template.version,
        )
