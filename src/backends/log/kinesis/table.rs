//! A consumer group's lease table in DynamoDB (its layout is in
//! [`super::leases`]). Every write is conditional on the lease's counter as
//! the writer last saw it; a write whose condition fails answers `None`:
//! someone else wrote the lease since.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;

use super::leases::{Checkpoint, Lease};
use crate::backends::log::LogError;

const KEY: &str = "leaseKey";
const OWNER: &str = "leaseOwner";
const COUNTER: &str = "leaseCounter";
const CHECKPOINT: &str = "checkpoint";
const SUB_SEQUENCE: &str = "checkpointSubSequenceNumber";
const SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
const PARENTS: &str = "parentShardId";
/// How long to wait for a new table to become ACTIVE.
const ACTIVE_WAIT: Duration = Duration::from_secs(120);

/// One group's lease table.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    client: Client,
    table: String,
}

fn error<E: std::error::Error + 'static>(table: &str, what: &str, e: E) -> LogError {
    LogError::Backend(format!(
        "DynamoDB lease table {table}: {what}: {}",
        DisplayErrorContext(&e)
    ))
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

/// A lease from a table item; None for an item that is not one.
fn lease_of(item: &HashMap<String, AttributeValue>) -> Option<Lease> {
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    Some(Lease {
        key: text(KEY)?,
        owner: text(OWNER),
        counter: item.get(COUNTER)?.as_n().ok()?.parse().ok()?,
        checkpoint: Checkpoint::from_table(&text(CHECKPOINT)?)?,
        parents: item
            .get(PARENTS)
            .and_then(|v| v.as_ss().ok())
            .cloned()
            .unwrap_or_default(),
    })
}

impl LeaseTable {
    /// Opens the table, creating it (on-demand capacity) on first use.
    pub async fn open(client: Client, table: String) -> Result<LeaseTable, LogError> {
        let created = client
            .create_table()
            .table_name(&table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(KEY)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| error(&table, "describing the key", e))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(KEY)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| error(&table, "describing the key", e))?,
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) => {}
            Err(e) => return Err(error(&table, "creating it", e)),
        }
        let deadline = tokio::time::Instant::now() + ACTIVE_WAIT;
        loop {
            let status = client
                .describe_table()
                .table_name(&table)
                .send()
                .await
                .map_err(|e| error(&table, "describing it", e))?
                .table()
                .and_then(|t| t.table_status().cloned());
            if status == Some(TableStatus::Active) {
                return Ok(LeaseTable { client, table });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(LogError::Backend(format!(
                    "DynamoDB lease table {table} is still {status:?} after {} s",
                    ACTIVE_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The table, if it exists and can be read (a group that never ran has
    /// none; one whose first member is creating it has no leases yet, and
    /// DynamoDB refuses to read it until it is active).
    pub async fn existing(client: Client, table: String) -> Result<Option<LeaseTable>, LogError> {
        match client.describe_table().table_name(&table).send().await {
            Ok(d) => Ok(match d.table().and_then(|t| t.table_status()) {
                Some(TableStatus::Creating | TableStatus::Deleting) => None,
                _ => Some(LeaseTable { client, table }),
            }),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(error(&table, "describing it", e)),
        }
    }

    /// Deletes the table and every lease in it.
    pub async fn delete(&self) -> Result<(), LogError> {
        self.client
            .delete_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| error(&self.table, "deleting it", e))?;
        Ok(())
    }

    /// Every lease, read consistently.
    pub async fn scan(&self) -> Result<Vec<Lease>, LogError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| error(&self.table, "reading the leases", e))?;
            out.extend(page.items().iter().filter_map(lease_of));
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Adds the lease of a new shard, unless it exists; true if added.
    pub async fn create(&self, key: &str, parents: &[String]) -> Result<bool, LogError> {
        let mut item = HashMap::from([
            (KEY.to_string(), s(key)),
            (COUNTER.to_string(), n(0)),
            (
                CHECKPOINT.to_string(),
                s(&Checkpoint::TrimHorizon.to_table()),
            ),
            (SUB_SEQUENCE.to_string(), n(0)),
            (SWITCHES.to_string(), n(0)),
        ]);
        if !parents.is_empty() {
            item.insert(PARENTS.to_string(), AttributeValue::Ss(parents.to_vec()));
        }
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", KEY)
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(error(&self.table, &format!("adding lease {key}"), e)),
        }
    }

    /// One conditional update: `set` (with `values`), the counter raised, if
    /// the counter is still `counter` and `owned_by` (when given) holds it.
    /// The new counter, or None when the condition failed.
    async fn update(
        &self,
        key: &str,
        counter: u64,
        owned_by: Option<&str>,
        set: &str,
        mut values: HashMap<String, AttributeValue>,
        what: &str,
    ) -> Result<Option<u64>, LogError> {
        let mut condition = "#c = :c".to_string();
        values.insert(":c".into(), n(counter));
        values.insert(":one".into(), n(1));
        if let Some(me) = owned_by {
            condition.push_str(" AND #o = :me");
            values.insert(":me".into(), s(me));
        }
        let update = format!("{set} ADD #c :one");
        // DynamoDB refuses names an expression does not use.
        let names: HashMap<String, String> = [
            ("#c", COUNTER),
            ("#o", OWNER),
            ("#cp", CHECKPOINT),
            ("#sub", SUB_SEQUENCE),
            ("#sw", SWITCHES),
        ]
        .into_iter()
        .filter(|(name, _)| {
            let used = |expr: &str| {
                expr.split(|c: char| !(c == '#' || c.is_ascii_alphanumeric()))
                    .any(|word| word == *name)
            };
            used(&update) || used(&condition)
        })
        .map(|(name, attribute)| (name.to_string(), attribute.to_string()))
        .collect();
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY, s(key))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        match out {
            Ok(_) => Ok(Some(counter + 1)),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(error(&self.table, &format!("{what} lease {key}"), e)),
        }
    }

    /// Renews a lease this member holds.
    pub async fn renew(&self, key: &str, counter: u64, me: &str) -> Result<Option<u64>, LogError> {
        self.update(
            key,
            counter,
            Some(me),
            "SET #o = :me",
            HashMap::new(),
            "renewing",
        )
        .await
    }

    /// Takes a lease (free, expired, or stolen) as it was last seen.
    pub async fn take(&self, key: &str, counter: u64, me: &str) -> Result<Option<u64>, LogError> {
        self.update(
            key,
            counter,
            None,
            "SET #o = :owner, #sw = #sw + :one",
            HashMap::from([(":owner".to_string(), s(me))]),
            "taking",
        )
        .await
    }

    /// Records how far this member has processed a lease it holds.
    pub async fn checkpoint(
        &self,
        key: &str,
        counter: u64,
        me: &str,
        checkpoint: &Checkpoint,
    ) -> Result<Option<u64>, LogError> {
        self.update(
            key,
            counter,
            Some(me),
            "SET #cp = :cp, #sub = :zero, #sw = :zero",
            HashMap::from([
                (":cp".to_string(), s(&checkpoint.to_table())),
                (":zero".to_string(), n(0)),
            ]),
            "checkpointing",
        )
        .await
    }

    /// Lets a lease go, so that another member takes it at once.
    pub async fn release(
        &self,
        key: &str,
        counter: u64,
        me: &str,
    ) -> Result<Option<u64>, LogError> {
        self.update(
            key,
            counter,
            Some(me),
            "REMOVE #o",
            HashMap::new(),
            "releasing",
        )
        .await
    }

    /// Moves a lease nobody holds (`sift topics offsets --reset-to`).
    pub async fn set_checkpoint(
        &self,
        key: &str,
        counter: u64,
        checkpoint: &Checkpoint,
    ) -> Result<Option<u64>, LogError> {
        self.update(
            key,
            counter,
            None,
            "SET #cp = :cp, #sub = :zero, #sw = :zero",
            HashMap::from([
                (":cp".to_string(), s(&checkpoint.to_table())),
                (":zero".to_string(), n(0)),
            ]),
            "setting the checkpoint of",
        )
        .await
    }
}
