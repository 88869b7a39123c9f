-- Token usage per tenant and day (UTC), added to as answers are saved.
CREATE TABLE tenant_usage (
    tenant_id         UUID NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    day               DATE NOT NULL,
    messages          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, day)
);
