//! Who may use the admin socket. The socket file is 0660, owned by the admin group, so the
//! kernel already keeps others out; moatd checks again on every connection from the
//! peer's credentials (SO_PEERCRED), and fails closed: root, moatd's own user, and members
//! of the admin group (as primary group or listed in /etc/group) are let in, nobody else.

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
    /// `None`: the configured group does not exist; only root and moatd's user get in.
    pub group: Option<Group>,
}

impl AdminAccess {
    /// The rule for admin group `group`, read from this host.
    pub fn for_host(group: &str) -> std::io::Result<Self> {
        let own_uid = std::fs::metadata("/proc/self")?.uid();
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Ok(Self {
            own_uid,
            group: find_group(&groups, group),
        })
    }

    /// Whether `peer` may use the socket; `passwd_file` names users for group membership.
    pub fn allows(&self, peer: Peer, passwd_file: &str) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        let Some(group) = &self.group else {
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
            group: find_group(GROUPS, "moat-admin"),
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
        assert!(access.allows(peer(0, 0), USERS), "root");
        assert!(access.allows(peer(998, 998), USERS), "moatd's user");
        assert!(access.allows(peer(1000, 1000), USERS), "listed member");
        assert!(access.allows(peer(1003, 997), USERS), "primary group");
        assert!(!access.allows(peer(1002, 1002), USERS), "not a member");
        assert!(!access.allows(peer(4242, 4242), USERS), "unknown user");
        // Without the group on this host, only root and moatd's user.
        let no_group = AdminAccess {
            own_uid: 998,
            group: None,
        };
        assert!(!no_group.allows(peer(1000, 1000), USERS));
        assert!(no_group.allows(peer(0, 0), USERS));
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
