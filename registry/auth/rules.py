"""Access rules: who may do what to which repositories.

A rule names repositories by glob (`*` stays within one path component, `**` crosses
them) or the catalog, the principals it applies to (users, groups, `*` for any signed-in
user, `anonymous` for everyone), and the actions it grants. Grants add up across rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ocispec.names import glob_to_regex

ACTIONS = ("pull", "push", "delete")
ANONYMOUS = None


@dataclass(frozen=True)
class Rule:
    repositories: tuple[str, ...] = ()
    catalog: bool = False
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    anonymous: bool = False
    actions: frozenset[str] = frozenset()
    _patterns: tuple[re.Pattern, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def create(cls, **values) -> "Rule":
        rule = cls(**values)
        object.__setattr__(rule, "_patterns", tuple(glob_to_regex(p) for p in rule.repositories))
        return rule

    def applies_to(self, user: str | None, groups_of_user: set[str]) -> bool:
        if self.anonymous:
            return True
        if user is None:
            return False
        return "*" in self.users or user in self.users or bool(groups_of_user & set(self.groups))

    def matches(self, resource_type: str, name: str) -> bool:
        if resource_type == "registry":
            return self.catalog and name == "catalog"
        return resource_type == "repository" and any(p.fullmatch(name) for p in self._patterns)


@dataclass(frozen=True)
class AccessRules:
    rules: tuple[Rule, ...]
    groups: dict[str, tuple[str, ...]]

    @classmethod
    def default(cls) -> "AccessRules":
        """With no rules configured: signed-in users may do everything, anonymous nothing."""
        return cls((Rule.create(repositories=("**",), catalog=True, users=("*",),
                                actions=frozenset(ACTIONS + ("*",))),), {})

    def groups_of(self, user: str | None) -> set[str]:
        if user is None:
            return set()
        return {group for group, members in self.groups.items() if user in members}

    def allowed(self, user: str | None, resource_type: str, name: str, requested: set[str]) -> set[str]:
        """The subset of `requested` actions `user` (None: anonymous) may take on the resource."""
        groups = self.groups_of(user)
        granted: set[str] = set()
        for rule in self.rules:
            if rule.matches(resource_type, name) and rule.applies_to(user, groups):
                granted |= rule.actions
        if "*" in granted:
            return set(requested)
        return set(requested) & granted
