-- Token usage per tenant and day (UTC), added to as answers are saved.
CREATE TABLE tenant_usage (
    tenant_id         BLOB NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    day               TEXT NOT NULL,
    messages          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, day)
);
