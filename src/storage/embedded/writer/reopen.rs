//! The writer's side of surviving I/O failures: after redb latched an I/O error, the next
//! transaction checks that the data directory has room again, reopens the file (see
//! `storage::recovery`) and resumes numbering from what is durably there, since a commit that
//! reported failure may still have reached the disk. Until then every batch fails with the
//! reason, and readiness stays false.

use super::Writer;
use crate::storage::StoreError;
use crate::storage::recovery::needs_reopen;

impl Writer {
    /// Begins the batch's write transaction, reopening the database first when the last
    /// failure left it unusable.
    pub(super) fn begin_write(&mut self) -> Result<redb::WriteTransaction, StoreError> {
        match self.store.db().begin_write() {
            Ok(t) => Ok(t),
            Err(e) if needs_reopen(&e) => {
                tracing::warn!(error = %e, "the database needs reopening after an I/O failure");
                self.store.db().check_headroom()?;
                self.store.db().reopen()?;
                self.tips = self.store.tips()?;
                Ok(self.store.db().begin_write()?)
            }
            Err(e) => Err(e.into()),
        }
    }
}
