-- Tenant names are unique (issue "Hostile input, floods and revocation"): two gateways that
-- bootstrap an empty database at once then create one `default` tenant between them, and an
-- operator never has to tell two tenants of the same name apart.
-- Names repeated before this migration keep their oldest holder; the others get their id (hex)
-- appended, so that the index can be built and nothing is lost.
UPDATE tenants SET name = name || ' (' || lower(hex(id)) || ')'
WHERE EXISTS (
    SELECT 1 FROM tenants older
    WHERE older.name = tenants.name
      AND (older.created_at < tenants.created_at
           OR (older.created_at = tenants.created_at AND older.id < tenants.id))
);
CREATE UNIQUE INDEX tenants_by_name ON tenants (name);
