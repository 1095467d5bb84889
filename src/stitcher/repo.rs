//! Delivery storage. Exactly-once: the delivery row and its job are written in one
//! transaction, and the `(caller, delivery_id)` primary key settles duplicates, even
//! concurrent ones (no read-then-write).

use diesel::prelude::*;

use super::model::DeliveryRow;
use crate::db::schema::webhook_deliveries;
use crate::db::{now_millis, DbConnection};
use crate::error::StoreError;
use crate::jobs::model::NewJob;
use crate::jobs::row::JobRow;
use crate::jobs::{repo as jobs_repo, JobId};

/// Store a delivery and create its job; with a delivery id seen before, return that
/// delivery's job and `true` (duplicate) and create nothing. With `same_body_only` (the
/// id is the caller's own `Idempotency-Key`), a repeat whose body differs from the
/// first is a conflict.
pub fn ingest(
    conn: &mut DbConnection,
    caller: &str,
    delivery_id: &str,
    payload: &str,
    job: &NewJob,
    same_body_only: bool,
) -> Result<(JobRow, bool), StoreError> {
    let now = now_millis();
    let row = jobs_repo::new_row(job, caller, None, now);
    let delivery = DeliveryRow {
        caller: caller.to_owned(),
        delivery_id: delivery_id.to_owned(),
        received_at: now,
        payload: payload.to_owned(),
        job_id: row.id.clone(),
    };
    let r = conn.transaction(|conn| {
        diesel::insert_into(webhook_deliveries::table)
            .values(&delivery)
            .execute(conn)?;
        jobs_repo::insert(conn, &row)
    });
    match r {
        Ok(()) => Ok((row, false)),
        Err(e) if e.is_unique_violation() => {
            let first: DeliveryRow = webhook_deliveries::table
                .find((caller, delivery_id))
                .select(DeliveryRow::as_select())
                .first(conn)?;
            if same_body_only && first.payload != payload {
                return Err(StoreError::Conflict(
                    "Idempotency-Key was used before with a different body".into(),
                ));
            }
            let id = JobId::parse(&first.job_id, "jobId")
                .map_err(|e| StoreError::Internal(format!("bad job id in delivery: {e}")))?;
            Ok((jobs_repo::find(conn, &id)?, true))
        }
        Err(e) => Err(e),
    }
}
