//! Signed manifests: `ember-manifest.json.minisig`, a minisign signature (Ed25519, the format of
//! the `minisign` tool) of `ember-manifest.json`. The manifest pins the SHA-256 of every file,
//! so a valid signature from a trusted key vouches for every weight byte; without one, anyone
//! who can write the weights bucket can write a matching manifest too.
//!
//! A loader given [`TrustedKeys`] refuses a model whose manifest is unsigned
//! ([`LoadError::Unsigned`]), signed by a key it does not trust ([`LoadError::UntrustedKey`]),
//! or changed after signing ([`LoadError::SignatureMismatch`]), before any weight is used.

use std::io::Cursor;
use std::path::Path;

use minisign::{PublicKey, SecretKey, SecretKeyBox, SignatureBox};

use crate::error::{LoadError, Result};
use crate::manifest::MANIFEST_FILE;

/// The signature's file name, beside the manifest (minisign's own naming: `FILE.minisig`).
pub const SIGNATURE_FILE: &str = "ember-manifest.json.minisig";

/// The public keys a model's manifest may be signed by. Empty: signatures are not required.
#[derive(Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl std::fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|k| key_id(k.keynum()))).finish()
    }
}

/// minisign's display form of a key ID: the 8 bytes as a little-endian number, in hex.
fn key_id(keynum: &[u8]) -> String {
    let mut le = [0u8; 8];
    let n = keynum.len().min(8);
    le[..n].copy_from_slice(&keynum[..n]);
    format!("{:016X}", u64::from_le_bytes(le))
}

impl TrustedKeys {
    /// Parses keys as users give them: a minisign public key string (`RW...`, the second
    /// line of a `.pub` file) or the path of a `.pub` file.
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Self> {
        let mut keys = Vec::new();
        for spec in specs.iter().map(|s| s.as_ref().trim()).filter(|s| !s.is_empty()) {
            let parsed =
                if Path::new(spec).is_file() { PublicKey::from_file(spec) } else { PublicKey::from_base64(spec) };
            let key = parsed.map_err(|e| LoadError::BadTrustedKey { key: spec.into(), message: e.to_string() })?;
            keys.push(key);
        }
        Ok(Self(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The IDs of the trusted keys, as minisign prints them.
    pub fn ids(&self) -> Vec<String> {
        self.0.iter().map(|k| key_id(k.keynum())).collect()
    }

    /// Checks that `signature` is a valid signature of `manifest` by one of the trusted keys,
    /// and returns that key's ID. `model` names the model in errors.
    pub fn verify(&self, model: &str, manifest: &[u8], signature: Option<&[u8]>) -> Result<String> {
        let Some(signature) = signature else {
            return Err(LoadError::Unsigned(model.into()));
        };
        let unreadable = |message: String| LoadError::BadSignature { model: model.into(), message };
        let text = std::str::from_utf8(signature).map_err(|e| unreadable(e.to_string()))?;
        let sig = SignatureBox::from_string(text).map_err(|e| unreadable(e.to_string()))?;
        let signer = key_id(sig.keynum());
        let Some(key) = self.0.iter().find(|k| k.keynum() == sig.keynum()) else {
            return Err(LoadError::UntrustedKey {
                model: model.into(),
                key_id: signer,
                trusted: self.ids().join(", "),
            });
        };
        // Quiet, no output, no legacy (non-prehashed) signatures: minisign itself has signed
        // prehashed by default since 0.8.
        minisign::verify(key, &sig, Cursor::new(manifest), true, false, false)
            .map_err(|_| LoadError::SignatureMismatch { model: model.into(), key_id: signer.clone() })?;
        Ok(signer)
    }
}

/// Reads a minisign secret key file. An encrypted key (minisign's default) is opened with
/// `password`, or a password asked for on the terminal when there is none.
pub fn read_secret_key(path: &Path, password: Option<String>) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    let bad = |e: minisign::PError| LoadError::Signing(format!("secret key `{}`: {e}", path.display()));
    match SecretKey::from_unencrypted_box(SecretKeyBox::from_string(&text).map_err(bad)?) {
        Ok(key) => Ok(key),
        Err(_) => SecretKey::from_box(SecretKeyBox::from_string(&text).map_err(bad)?, password).map_err(bad),
    }
}

/// Signs `dir/ember-manifest.json` with `key`, writing `dir/ember-manifest.json.minisig`.
/// Returns the signing key's ID.
pub fn sign_manifest(dir: &Path, key: &SecretKey) -> Result<String> {
    let path = dir.join(MANIFEST_FILE);
    let manifest = std::fs::read(&path).map_err(|e| LoadError::io(&path, e))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // The trusted comment is signed too; this one is what the minisign tool writes by default.
    let trusted = format!("timestamp:{now}\tfile:{MANIFEST_FILE}\thashed");
    let sig =
        minisign::sign(None, key, Cursor::new(&manifest), Some(&trusted), Some("signature from ember secret key"))
            .map_err(|e| LoadError::Signing(e.to_string()))?;
    let out = dir.join(SIGNATURE_FILE);
    std::fs::write(&out, sig.into_string()).map_err(|e| LoadError::io(&out, e))?;
    Ok(key_id(key.keynum()))
}

/// A new unencrypted key pair: (secret key file text, public key file text, key ID).
pub fn generate_keypair() -> Result<(String, String, String)> {
    let pair = minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| LoadError::Signing(e.to_string()))?;
    let id = key_id(pair.pk.keynum());
    let sk = pair.sk.to_box(None).map_err(|e| LoadError::Signing(e.to_string()))?.into_string();
    let pk = pair.pk.to_box().map_err(|e| LoadError::Signing(e.to_string()))?.into_string();
    Ok((sk, pk, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Result<(SecretKey, TrustedKeys)> {
        let (sk, pk, _) = generate_keypair()?;
        let sk = SecretKey::from_unencrypted_box(
            SecretKeyBox::from_string(&sk).map_err(|e| LoadError::Signing(e.to_string()))?,
        )
        .map_err(|e| LoadError::Signing(e.to_string()))?;
        let pk_line = pk.lines().nth(1).unwrap_or_default().to_string();
        Ok((sk, TrustedKeys::parse(&[pk_line])?))
    }

    #[test]
    fn each_refusal_has_its_own_error() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| LoadError::io("tmp", e))?;
        std::fs::write(dir.path().join(MANIFEST_FILE), b"{\"version\":1,\"files\":{}}")
            .map_err(|e| LoadError::io("m", e))?;
        let (sk, trusted) = keys()?;
        let (_, other) = keys()?;
        sign_manifest(dir.path(), &sk)?;
        let manifest = std::fs::read(dir.path().join(MANIFEST_FILE)).map_err(|e| LoadError::io("m", e))?;
        let sig = std::fs::read(dir.path().join(SIGNATURE_FILE)).map_err(|e| LoadError::io("s", e))?;

        assert_eq!(trusted.verify("m", &manifest, Some(&sig))?, trusted.ids()[0]);
        assert!(matches!(trusted.verify("m", &manifest, None), Err(LoadError::Unsigned(_))));
        assert!(matches!(other.verify("m", &manifest, Some(&sig)), Err(LoadError::UntrustedKey { .. })));
        let mut edited = manifest.clone();
        edited[2] ^= 0x01;
        assert!(matches!(trusted.verify("m", &edited, Some(&sig)), Err(LoadError::SignatureMismatch { .. })));
        assert!(matches!(trusted.verify("m", &manifest, Some(b"junk")), Err(LoadError::BadSignature { .. })));
        assert!(matches!(TrustedKeys::parse(&["RWnot-a-key"]), Err(LoadError::BadTrustedKey { .. })));
        Ok(())
    }
}
