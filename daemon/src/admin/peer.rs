//! Who may use the admin and audit sockets. Each socket file is 0660, owned by its group,
//! so the kernel already keeps others out; moatd checks again on every connection from the
//! peer's credentials (SO_PEERCRED) against /etc/passwd and /etc/group as they are then,
//! and fails closed: root, moatd's own user, and members of the socket's group (as primary
//! group or listed in /etc/group) are let in, nobody else. A member's open connections and
//! already running moatctl are not cut off, but every new connection is checked afresh.

use std::os::unix::fs::MetadataExt as _;

/// The connecting process, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid={} gid={}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid={pid}")?;
        }
        Ok(())
    }
}

/// An /etc/group entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The group `name` in /etc/group text.
pub fn find_group(group_file: &str, name: &str) -> Option<Group> {
    // The first line naming the group decides; a malformed one fails closed.
    group_file
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            if fields.next()? != name {
                return None;
            }
            let (_, gid, members) = (fields.next(), fields.next(), fields.next());
            let group = gid
                .and_then(|gid| gid.trim().parse().ok())
                .map(|gid| Group {
                    name: name.to_owned(),
                    gid,
                    members: members
                        .unwrap_or_default()
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned)
                        .collect(),
                });
            Some(group)
        })
        .flatten()
}

/// The name of user `uid` in /etc/passwd text.
pub fn user_name(passwd_file: &str, uid: u32) -> Option<String> {
    passwd_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        let (name, _, id) = (fields.next()?, fields.next()?, fields.next()?);
        (id.trim().parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// The admission rule for the socket.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    pub own_uid: u32,
    /// The group whose members get in (if it exists on the host).
    pub group: String,
}

impl AdminAccess {
    /// The rule for group `group` on this host.
    pub fn for_host(group: &str) -> std::io::Result<Self> {
        Ok(Self {
            own_uid: std::fs::metadata("/proc/self")?.uid(),
            group: group.to_owned(),
        })
    }

    /// Whether `peer` may use the socket, by the account files as they are now (read for
    /// each connection, so that removing someone from the group takes effect at once).
    pub fn allows(&self, peer: Peer, passwd_file: &str, group_file: &str) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        // Without the group on this host, only root and moatd's user get in.
        let Some(group) = find_group(group_file, &self.group) else {
            return false;
        };
        peer.gid == group.gid
            || user_name(passwd_file, peer.uid).is_some_and(|name| group.members.contains(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUPS: &str = "root:x:0:\nmoat:x:998:\nmoat-admin:x:997:alice, bob\n";
    const USERS: &str = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n\
        bob:x:1001:1001::/home/bob:/bin/sh\nmallory:x:1002:1002::/home/m:/bin/sh\n\
        carol:x:1003:997::/home/c:/bin/sh\n";

    fn access() -> AdminAccess {
        AdminAccess {
            own_uid: 998,
            group: "moat-admin".into(),
        }
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(42),
        }
    }

    #[test]
    fn root_moatd_and_the_admin_group_get_in_and_nobody_else() {
        let access = access();
        assert!(access.allows(peer(0, 0), USERS, GROUPS), "root");
        assert!(access.allows(peer(998, 998), USERS, GROUPS), "moatd's user");
        assert!(
            access.allows(peer(1000, 1000), USERS, GROUPS),
            "listed member"
        );
        assert!(
            access.allows(peer(1003, 997), USERS, GROUPS),
            "primary group"
        );
        assert!(
            !access.allows(peer(1002, 1002), USERS, GROUPS),
            "not a member"
        );
        assert!(
            !access.allows(peer(4242, 4242), USERS, GROUPS),
            "unknown user"
        );
        // Taken out of the group: refused from the next connection on.
        let without_alice = GROUPS.replace("alice, bob", "bob");
        assert!(!access.allows(peer(1000, 1000), USERS, &without_alice));
        // Without the group on this host, only root and moatd's user.
        let no_group = "root:x:0:\nmoat:x:998:\n";
        assert!(!access.allows(peer(1000, 1000), USERS, no_group));
        assert!(access.allows(peer(0, 0), USERS, no_group));
    }

    #[test]
    fn group_and_passwd_lines_parse_and_malformed_lines_are_skipped() {
        let group = find_group(
            "broken\nmoat-admin:x:notanumber:\nmoat-admin:x:5:a\n",
            "moat-admin",
        );
        assert_eq!(
            group, None,
            "the first matching line decides; a bad gid fails closed"
        );
        assert_eq!(
            user_name("x\nalice:x:1000:1000::/:/bin/sh\n", 1000).as_deref(),
            Some("alice")
        );
        assert_eq!(user_name("alice:x:abc:1000::/:/bin/sh\n", 1000), None);
    }
}
