use super::*;

/// openssl req -x509 -newkey ec -days 36500: notBefore a UTCTime, notAfter (2126) a
/// GeneralizedTime.
const EC_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBkDCCATegAwIBAgIUfNYNaBYsFN4AlEv/tl0avLJHm3QwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwScG9kbGVhc2UtdW5pdC10ZXN0MCAXDTI2MTIwMjE5MDMzM1oY
DzIxMjYxMTA4MTkwMzMzWjAdMRswGQYDVQQDDBJwb2RsZWFzZS11bml0LXRlc3Qw
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQEGxLVvJ4Ug/CBsNmKiuZFDmzI2zIV
UMYBp6Azor+yKQvorPR1oB0BnFoQNzlk05i6TaiqddUzkfUzchsJoPrTo1MwUTAd
BgNVHQ4EFgQUTyDuf5321Bjcm3XfKnOUamTe9kkwHwYDVR0jBBgwFoAUTyDuf532
1Bjcm3XfKnOUamTe9kkwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBE
AiAAwOau9Xjz42GY+JZiqqlHEhRt1PO5OxwG1dTU1dC2NwIgAxb29P2qkaskAn3e
9cN7VtSujKwtASE/P7M2u1ipBVM=
-----END CERTIFICATE-----";

/// openssl req -x509 -newkey rsa:2048 -days 2: long-form DER lengths.
const RSA_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIDDzCCAfegAwIBAgIURzQqYFGX50Wx2c0mnFF7pgEb93MwDQYJKoZIhvcNAQEL
BQAwFzEVMBMGA1UEAwwMcG9kbGVhc2UtcnNhMB4XDTI2MTIwMjE5MDMzOFoXDTI2
MTIwNDE5MDMzOFowFzEVMBMGA1UEAwwMcG9kbGVhc2UtcnNhMIIBIjANBgkqhkiG
9w0BAQEFAAOCAQ8AMIIBCgKCAQEA6jJgegryOzaEr6vUWnQkkP3phSwIYfCgtoNh
c0/OX74eyWWZF6La03FbKlLkHHwJE6heG4dUYe4HLs06k/fyO+QJUI0xzT0Lw/rW
lkSXrxAnZOS3p/r6Z/I/2j2E4jNAaCkJDrSF115X9KxcncbaBTy5szKuMbaBg/Fb
zpUIepsae6/VBiryOQ7Go3GK/IGTkrdBt62U6DA6VQdbUwEb0Rklmjh8+FAyddku
xQVyquilUrmJOI/z8YzBudlrn3JoadSf8b5d1ChhtDqrGss3rV+5CE8GfeqfWeRZ
rEg087N0RuMw+3Vux/UPKJ+zhrwQE/YOjYI0WUbZz/tpQ1jeKwIDAQABo1MwUTAd
BgNVHQ4EFgQUts8Qe0Bo2vWc83KAbChw970Syr4wHwYDVR0jBBgwFoAUts8Qe0Bo
2vWc83KAbChw970Syr4wDwYDVR0TAQH/BAUwAwEB/zANBgkqhkiG9w0BAQsFAAOC
AQEARsMWRZvfANtaujk07Sz/YglahtAu/5WJRfk6xv/l/LTNNOmZfLL4mHpvC9yi
gei75SGZZhmcIb9A33gtjZch05QdzwGtJ3rMV8bnkZu44g7ocUPxK6ihKYtHH/Yu
HUKsiwbo8nkXbGDdzqhxlYBZrrhnIT7WKOfOH+KdYa+dM0LVFtvF0NnyJhkIKlVu
qNYWJclMmw2x00xD6OIQ6WluKNCdVUkHrk9tlUk5Vrdizgd1yqS/VLC3s/vIihCj
kAr+d7aPi1FvD3whtLMGkS6lrdUurjX9m/sst4m8PiDMNtSgDIhjtaGSrGoStaRN
sxhvcuORl5mrzo3AFMBeHS8vgw==
-----END CERTIFICATE-----";

#[test]
fn validity_reads_both_time_forms_as_openssl_prints_them() {
    // `date -d "$(openssl x509 -noout -startdate …)" +%s`, and -enddate.
    assert_eq!(validity(EC_CERT.as_bytes()), Some((1_796_238_213, 4_949_838_213)));
    assert_eq!(validity(RSA_CERT.as_bytes()), Some((1_796_238_218, 1_796_411_018)));
}

#[test]
fn a_key_or_garbage_has_no_validity() {
    assert_eq!(validity(b"-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----\n"), None);
    assert_eq!(validity(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"), None);
    let truncated = format!("{}\n-----END CERTIFICATE-----", &EC_CERT[..200]);
    assert_eq!(validity(truncated.as_bytes()), None);
}

#[test]
fn the_warning_comes_with_a_third_of_the_validity_left_at_most_thirty_days_before() {
    let day = 86_400;
    // A 90-day certificate (cert-manager's default): warned at 30 days left.
    assert_eq!(expiry_warning(0, 90 * day, 59 * day), None);
    let w = expiry_warning(0, 90 * day, 61 * day).expect("warned");
    assert!(w.contains("expires in 29 days"), "{w}");
    // A one-year certificate: 30 days before, not four months.
    assert_eq!(expiry_warning(0, 365 * day, 300 * day), None);
    assert!(expiry_warning(0, 365 * day, 336 * day).is_some());
    // A 150 s certificate: the last 50 s.
    assert_eq!(expiry_warning(1000, 1150, 1099), None);
    assert!(expiry_warning(1000, 1150, 1101).unwrap().contains("expires in 49 s"));
    // Expired.
    let w = expiry_warning(0, 100, 400).unwrap();
    assert!(w.contains("expired 5 min ago"), "{w}");
}
