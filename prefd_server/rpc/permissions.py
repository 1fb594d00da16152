"""The permission table: which callers each RPC admits before its handler runs."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

from prefd_server.rpc.principal import Principal


class Access(enum.Enum):
    """The static requirement of one RPC, checked for every call after authentication and the
    request-limits parse, before the handler."""

    ADMIN = "admin"  # admin tokens only
    SERVICE = "service"  # service or admin tokens
    # Any authenticated caller; the handler checks the resource the request names (a scope, a
    # subject, a configuration), since that needs the request.
    RESOURCE = "resource"


_PREFERENCES = "/prefd.v1.PreferencesService/"
_AI_CONFIG = "/prefd.v1.AIConfigService/"
_AUDIT = "/prefd.v1.AuditService/"
_HEALTH = "/prefd.v1.HealthService/"
_NOTIFICATIONS = "/prefd.v1.NotificationService/"
_STATISTICS = "/prefd.v1.StatisticsService/"
_TEMPLATES = "/prefd.v1.TemplateService/"

PERMISSIONS: Mapping[str, Access] = {
    # Definitions: everyone reads the catalog, admins change it.
    _PREFERENCES + "CreateDefinition": Access.ADMIN,
    _PREFERENCES + "UpdateDefinition": Access.ADMIN,
    _PREFERENCES + "GetDefinition": Access.RESOURCE,
    _PREFERENCES + "ListDefinitions": Access.RESOURCE,
    _PREFERENCES + "DeleteDefinition": Access.ADMIN,
    # Overrides and reads: per scope (require_write / require_read_scope) and per subject (require_read).
    _PREFERENCES + "SetPreferences": Access.RESOURCE,
    _PREFERENCES + "DeletePreferences": Access.RESOURCE,
    _PREFERENCES + "ResetPreferences": Access.RESOURCE,
    _PREFERENCES + "ListPreferences": Access.RESOURCE,
    _PREFERENCES + "GetEffectivePreferences": Access.RESOURCE,
    _PREFERENCES + "BatchGetEffectivePreferences": Access.RESOURCE,
    _PREFERENCES + "WatchPreferences": Access.RESOURCE,
    # AI configurations: per owner scope; the model catalog: everyone reads, admins change.
    _AI_CONFIG + "CreateAIConfig": Access.RESOURCE,
    _AI_CONFIG + "UpdateAIConfig": Access.RESOURCE,
    _AI_CONFIG + "GetAIConfig": Access.RESOURCE,
    _AI_CONFIG + "ListAIConfigs": Access.RESOURCE,
    _AI_CONFIG + "DeleteAIConfig": Access.RESOURCE,
    _AI_CONFIG + "SetAIConfigActive": Access.RESOURCE,
    _AI_CONFIG + "RotateAPIKey": Access.RESOURCE,
    _AI_CONFIG + "GetEffectiveAIConfig": Access.RESOURCE,
    _AI_CONFIG + "ListModels": Access.RESOURCE,
    _AI_CONFIG + "UpdateModel": Access.ADMIN,
    _AI_CONFIG + "EstimateCost": Access.RESOURCE,
    _AI_CONFIG + "RecordUsage": Access.SERVICE,
    _AI_CONFIG + "GetBudgetStatus": Access.RESOURCE,
    _AI_CONFIG + "WatchAIConfig": Access.RESOURCE,
    # History, rollback and erasure are admin work; a user may export its own data.
    _AUDIT + "ListChanges": Access.ADMIN,
    _AUDIT + "GetChange": Access.ADMIN,
    _AUDIT + "DiffScope": Access.ADMIN,
    _AUDIT + "PreviewRollback": Access.ADMIN,
    _AUDIT + "Rollback": Access.ADMIN,
    _AUDIT + "ExportUserData": Access.RESOURCE,
    _AUDIT + "EraseUserData": Access.ADMIN,
    # Health: any caller sees the summary; the database report and maintenance are admin work.
    _HEALTH + "GetSystemHealth": Access.RESOURCE,
    _HEALTH + "GetDatabaseHealth": Access.ADMIN,
    _HEALTH + "RunMaintenance": Access.ADMIN,
    _HEALTH + "GetMaintenanceOperation": Access.ADMIN,
    _HEALTH + "ListMaintenanceOperations": Access.ADMIN,
    # Notifications: a user decides and records consent for itself; services and admins for anyone.
    _NOTIFICATIONS + "Decide": Access.RESOURCE,
    _NOTIFICATIONS + "DecideBatch": Access.RESOURCE,
    _NOTIFICATIONS + "GrantConsent": Access.RESOURCE,
    _NOTIFICATIONS + "WithdrawConsent": Access.RESOURCE,
    _NOTIFICATIONS + "ListConsents": Access.RESOURCE,
    _NOTIFICATIONS + "ListConsentHistory": Access.RESOURCE,
    # Templates: admins keep them, anyone reads them; applying is a write at the scope named (require_write).
    _TEMPLATES + "CreateTemplate": Access.ADMIN,
    _TEMPLATES + "UpdateTemplate": Access.ADMIN,
    _TEMPLATES + "GetTemplate": Access.RESOURCE,
    _TEMPLATES + "ListTemplates": Access.RESOURCE,
    _TEMPLATES + "DeleteTemplate": Access.ADMIN,
    _TEMPLATES + "ApplyTemplate": Access.RESOURCE,
    # Statistics count every user's overrides (values of sensitive keys never): services and admins.
    _STATISTICS + "GetKeyStatistics": Access.SERVICE,
    _STATISTICS + "GetCategoryStatistics": Access.SERVICE,
    _STATISTICS + "GetAdoption": Access.SERVICE,
    _STATISTICS + "ListDailyRollups": Access.SERVICE,
}


class UnlistedMethod(LookupError):
    """An RPC registered without an entry in the permission table (refused at start-up)."""

    def __init__(self, method: str) -> None:
        super().__init__(f"{method} has no entry in prefd_server.rpc.permissions.PERMISSIONS: decide who may call it")


Admission = Callable[[Principal], None]


def admission(method: str, table: Mapping[str, Access] = PERMISSIONS) -> Admission | None:
    """The check every call of `method` (`/package.Service/Method`) passes before its handler, or
    None when the handler alone decides (RESOURCE). UnlistedMethod when the table has no entry."""
    access = table.get(method)
    if access is None:
        raise UnlistedMethod(method)
    # The action named in the refusal is the method's own name, as the handlers named it.
    action = method.rsplit("/", 1)[-1]
    if access is Access.ADMIN:
        return lambda principal: principal.require_admin(action)
    if access is Access.SERVICE:
        return lambda principal: principal.require_service(action)
    return None
